//! Procedural macros of the `outbox` framework. Use them through the `outbox` crate:
//! `#[derive(outbox::OutboxEvent)]` and `#[outbox::handler]`.

use proc_macro::TokenStream;

mod event;
mod handler;

/// See `outbox::OutboxEvent`.
#[proc_macro_derive(OutboxEvent, attributes(outbox))]
pub fn derive_outbox_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    event::expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// See `outbox::handler`.
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(args.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Collects errors so that one compile reports every mistake, each at its own span.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Parses the value of `crate = "path"`.
fn parse_crate_path(lit: &syn::LitStr) -> syn::Result<syn::Path> {
    lit.parse::<syn::Path>().map_err(|_| {
        syn::Error::new(
            lit.span(),
            "`crate` must be a path to the outbox crate, for instance \"::outbox\"",
        )
    })
}

fn default_crate_path() -> syn::Path {
    syn::parse_quote!(::outbox)
}
