use crate::{default_crate_path, parse_crate_path, Errors};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitInt, LitStr};

#[derive(Default)]
struct StructAttrs {
    event_type: Option<LitStr>,
    aggregate_type: Option<LitStr>,
    version: Option<LitInt>,
    topic: Option<LitStr>,
    krate: Option<syn::Path>,
    upcast_from: Option<syn::Type>,
}

pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) => Some(&named.named),
            Fields::Unnamed(_) | Fields::Unit => {
                errors.push(syn::Error::new(
                    input.ident.span(),
                    "#[derive(OutboxEvent)] needs a struct with named fields, one of them marked #[outbox(aggregate_id)]",
                ));
                None
            }
        },
        Data::Enum(data) => {
            errors.push(syn::Error::new(
                data.enum_token.span(),
                "#[derive(OutboxEvent)] is not supported on enums: derive it on one struct per event type",
            ));
            None
        }
        Data::Union(data) => {
            errors.push(syn::Error::new(
                data.union_token.span(),
                "#[derive(OutboxEvent)] is not supported on unions",
            ));
            None
        }
    };

    let attrs = parse_struct_attrs(&input, &mut errors);

    let mut aggregate_field: Option<&syn::Field> = None;
    for field in fields.into_iter().flatten() {
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("outbox")) {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("aggregate_id") {
                    if aggregate_field.is_some() {
                        errors.push(meta.error(
                            "only one field can be #[outbox(aggregate_id)]; an event belongs to one aggregate",
                        ));
                    } else {
                        aggregate_field = Some(field);
                    }
                    Ok(())
                } else {
                    Err(meta.error("unknown outbox field attribute; the only one is `aggregate_id`"))
                }
            });
            if let Err(e) = parsed {
                errors.push(e);
            }
        }
    }
    if fields.is_some() && aggregate_field.is_none() {
        errors.push(syn::Error::new(
            input.ident.span(),
            "missing #[outbox(aggregate_id)]: mark the field that identifies the aggregate this event belongs to",
        ));
    }
    errors.finish()?;
    let field = aggregate_field.expect("checked above");
    let field_ident = field.ident.as_ref().expect("named field");

    let krate = attrs.krate.unwrap_or_else(default_crate_path);
    let ident = &input.ident;
    let event_type = attrs
        .event_type
        .unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));
    let aggregate_type = attrs.aggregate_type.unwrap_or_else(|| {
        let field_name = field_ident.to_string();
        let name = match field_name.strip_suffix("_id") {
            Some(stem) if !stem.is_empty() => stem.to_owned(),
            _ => snake_case(&ident.to_string()),
        };
        LitStr::new(&name, Span::call_site())
    });
    let topic = attrs.topic.unwrap_or_else(|| aggregate_type.clone());
    let version = attrs
        .version
        .unwrap_or_else(|| LitInt::new("1", Span::call_site()));

    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut where_clause = where_clause
        .cloned()
        .unwrap_or_else(|| syn::parse_quote!(where));
    where_clause
        .predicates
        .push(syn::parse_quote!(#ident #ty_generics: #krate::__private::Serialize));

    // Spanned on the field's type so "does not implement Display" points at the field.
    let to_string = quote_spanned! {field.ty.span()=>
        #krate::__private::ToString::to_string(&self.#field_ident)
    };

    // `#[outbox(upcast_from = Old)]`: `From<Old>` for this struct is the step from `Old`'s
    // version to this one, registered like handlers. Spanned on `Old`, so a missing `From`
    // impl or `Deserialize` points at the attribute.
    let upcaster = match &attrs.upcast_from {
        Some(old) if !input.generics.params.is_empty() => {
            return Err(syn::Error::new(
                old.span(),
                "`upcast_from` is not supported on generic events",
            ))
        }
        Some(old) => {
            let register = quote_spanned! {old.span()=>
                #krate::__private::UpcasterRegistration::new::<#old, #ident>(
                    #krate::__private::concat!(
                        #krate::__private::module_path!(),
                        "::",
                        #krate::__private::stringify!(#ident),
                        " from ",
                        #krate::__private::stringify!(#old)
                    )
                )
            };
            // A step must go from an older version to this one, of the same event type:
            // checked at compile time, not at start-up.
            let checks = quote_spanned! {old.span()=>
                const _: () = {
                    ::core::assert!(
                        <#old as #krate::__private::OutboxEvent>::SCHEMA_VERSION
                            < <#ident as #krate::__private::OutboxEvent>::SCHEMA_VERSION,
                        "`upcast_from` must name an older version of this event: its `version` is not lower"
                    );
                    ::core::assert!(
                        #krate::__private::same_str(
                            <#old as #krate::__private::OutboxEvent>::EVENT_TYPE,
                            <#ident as #krate::__private::OutboxEvent>::EVENT_TYPE,
                        ),
                        "`upcast_from` must name a version of the same event type"
                    );
                };
            };
            quote! {
                #checks
                #krate::__private::inventory::submit! { #register }
            }
        }
        None => quote! {},
    };

    Ok(quote! {
        const _: () = {
            #upcaster

            #[automatically_derived]
            impl #impl_generics #krate::__private::OutboxEvent for #ident #ty_generics #where_clause {
                const EVENT_TYPE: &'static str = #event_type;
                const AGGREGATE_TYPE: &'static str = #aggregate_type;
                const SCHEMA_VERSION: u32 = #version;
                const TOPIC: &'static str = #topic;

                fn aggregate_id(&self) -> #krate::__private::String {
                    #to_string
                }
            }
        };
    })
}

fn parse_struct_attrs(input: &DeriveInput, errors: &mut Errors) -> StructAttrs {
    let mut attrs = StructAttrs::default();
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("outbox")) {
        let parsed = attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            macro_rules! once {
                ($slot:expr, $value:expr) => {{
                    let value = $value;
                    if $slot.is_some() {
                        errors.push(meta.error(format!("duplicate outbox attribute `{key}`")));
                    } else {
                        $slot = Some(value);
                    }
                }};
            }
            // A value of the wrong type is reported and parsing goes on, so that one build
            // shows every mistake; a value that is not a literal at all stops this attribute.
            match key.as_str() {
                "event_type" | "aggregate_type" | "topic" | "crate" => {
                    let lit: syn::Lit = meta.value()?.parse()?;
                    let checked = string(lit, &key).and_then(|s| {
                        if key == "crate" {
                            parse_crate_path(&s).map(Err)
                        } else {
                            non_empty(s).map(Ok)
                        }
                    });
                    match (key.as_str(), checked) {
                        (_, Err(e)) => errors.push(e),
                        ("event_type", Ok(Ok(s))) => once!(attrs.event_type, s),
                        ("aggregate_type", Ok(Ok(s))) => once!(attrs.aggregate_type, s),
                        ("topic", Ok(Ok(s))) => once!(attrs.topic, s),
                        (_, Ok(Err(path))) => once!(attrs.krate, path),
                        _ => unreachable!("keys matched above"),
                    }
                }
                "version" => {
                    let lit: syn::Lit = meta.value()?.parse()?;
                    match version(lit) {
                        Ok(v) => once!(attrs.version, v),
                        Err(e) => errors.push(e),
                    }
                }
                "upcast_from" => {
                    let value = meta.value()?;
                    if value.peek(syn::Lit) {
                        let lit: syn::Lit = value.parse()?;
                        errors.push(syn::Error::new(
                            lit.span(),
                            "`upcast_from` takes the older struct's type, not a string: for instance `upcast_from = OrderPlacedV1`",
                        ));
                    } else {
                        once!(attrs.upcast_from, value.parse::<syn::Type>()?);
                    }
                }
                "aggregate_id" => {
                    return Err(meta.error(
                        "`aggregate_id` goes on the field that holds the id: #[outbox(aggregate_id)]",
                    ))
                }
                _ => {
                    return Err(meta.error(
                        "unknown outbox attribute; expected one of `event_type`, `aggregate_type`, `version`, `topic`, `upcast_from`, `crate`",
                    ))
                }
            }
            Ok(())
        });
        if let Err(e) = parsed {
            errors.push(e);
        }
    }
    attrs
}

fn string(lit: syn::Lit, key: &str) -> syn::Result<LitStr> {
    match lit {
        syn::Lit::Str(s) => Ok(s),
        other => Err(syn::Error::new(
            other.span(),
            format!("`{key}` takes a string literal, for instance `{key} = \"...\"`"),
        )),
    }
}

fn version(lit: syn::Lit) -> syn::Result<LitInt> {
    let syn::Lit::Int(int) = lit else {
        return Err(syn::Error::new(
            lit.span(),
            "`version` takes an integer, for instance `version = 2`",
        ));
    };
    let n: u32 = int
        .base10_parse()
        .map_err(|_| syn::Error::new(int.span(), "`version` must fit in a u32"))?;
    if n == 0 {
        return Err(syn::Error::new(int.span(), "`version` starts at 1"));
    }
    Ok(LitInt::new(&n.to_string(), int.span()))
}

fn non_empty(lit: LitStr) -> syn::Result<LitStr> {
    if lit.value().trim().is_empty() {
        Err(syn::Error::new(lit.span(), "must not be empty"))
    } else {
        Ok(lit)
    }
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn snake_case() {
        assert_eq!(super::snake_case("PaymentCreated"), "payment_created");
        assert_eq!(super::snake_case("Order"), "order");
    }
}
