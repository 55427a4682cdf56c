use crate::{default_crate_path, parse_crate_path, Errors};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn};

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let mut krate = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("crate") {
            krate = Some(parse_crate_path(&meta.value()?.parse()?)?);
            Ok(())
        } else {
            Err(meta.error("unknown handler attribute; the only one is `crate = \"...\"`"))
        }
    });
    syn::parse::Parser::parse2(parser, args)?;
    let krate = krate.unwrap_or_else(default_crate_path);

    let function: ItemFn = syn::parse2(item)?;
    let mut errors = Errors::default();
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new(
            sig.fn_token.span(),
            "#[outbox::handler] needs an `async fn`",
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new(
            sig.generics.span(),
            "#[outbox::handler] functions cannot be generic: register one handler per event type",
        ));
    }
    let mut arg_types = Vec::new();
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(r) => errors.push(syn::Error::new(
                r.span(),
                "#[outbox::handler] must be a free function, not a method",
            )),
            FnArg::Typed(t) => arg_types.push(&t.ty),
        }
    }
    if arg_types.is_empty() || arg_types.len() > 2 {
        errors.push(syn::Error::new(
            sig.inputs
                .span()
                .join(sig.paren_token.span.join())
                .unwrap_or(sig.ident.span()),
            "#[outbox::handler] takes the event and optionally a HandlerContext: \
             `async fn on_x(event: MyEvent, ctx: HandlerContext) -> Result<(), HandlerError>`",
        ));
    }
    errors.finish()?;

    let name = &sig.ident;
    let event = arg_types[0];
    let call = if arg_types.len() == 2 {
        quote!(#name)
    } else {
        quote!(|event, _ctx| #name(event))
    };
    let call_handler = quote_spanned! {event.span()=>
        #krate::__private::call_handler::<#event, _, _>
    };
    Ok(quote! {
        #function

        const _: () = {
            fn __outbox_erased(
                payload: &str,
                ctx: #krate::__private::HandlerContext,
            ) -> #krate::__private::BoxFuture<
                'static,
                ::core::result::Result<(), #krate::__private::CallError>,
            > {
                #call_handler(payload, ctx, #call)
            }

            #krate::__private::inventory::submit! {
                #krate::__private::HandlerRegistration::new::<#event>(
                    #krate::__private::concat!(
                        #krate::__private::module_path!(), "::", #krate::__private::stringify!(#name)
                    ),
                    __outbox_erased,
                )
            }
        };
    })
}
