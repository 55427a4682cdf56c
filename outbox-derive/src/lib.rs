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

/// Fuzzing of the attribute parsing: malformed attributes give a compile error, never a panic.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "event_type",
            "aggregate_type",
            "aggregate_id",
            "version",
            "schema_version",
            "topic",
            "crate",
            "upcast_from",
            "rename",
            "Foo",
            "r#type",
        ])
    }

    fn value() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "\"x\"",
            "\"order.placed\"",
            "\"\"",
            "\"a b\"",
            "\"\\u{0}\"",
            "\"crate::x\"",
            "\"::\"",
            "1",
            "0",
            "-1",
            "99999999999999999999",
            "1.5",
            "true",
            "Foo",
            "crate::Foo",
            "b\"x\"",
            "'c'",
        ])
    }

    /// One attribute item: `key`, `key = value`, `key(value)`, or a stray token.
    fn item() -> impl Strategy<Value = String> {
        prop_oneof![
            key().prop_map(str::to_owned),
            (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
            (key(), value()).prop_map(|(k, v)| format!("{k}({v})")),
            value().prop_map(str::to_owned),
            prop::sample::select(vec!["=", "::", ",", "= ="]).prop_map(str::to_owned),
        ]
    }

    fn attribute() -> impl Strategy<Value = String> {
        proptest::collection::vec(item(), 0..6).prop_map(|items| items.join(", "))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn derive_attributes(outer in attribute(), field in attribute(), second in attribute()) {
            let source = format!(
                "#[outbox({outer})] struct Event {{ #[outbox({field})] id: String, \
                 #[outbox({second})] n: u32 }}"
            );
            let input = syn::parse_str::<syn::DeriveInput>(&source)
                .expect("attribute contents are free-form tokens");
            if let Err(error) = crate::event::expand(input) {
                prop_assert!(!error.to_string().is_empty());
            }
        }

        #[test]
        fn handler_attributes(args in attribute(), signature in attribute()) {
            let Ok(args) = args.parse::<proc_macro2::TokenStream>() else {
                return Ok(());
            };
            let item = format!("async fn on_event(event: Event, ctx: Ctx {signature}) {{}}");
            let Ok(item) = item.parse::<proc_macro2::TokenStream>() else {
                return Ok(());
            };
            if let Err(error) = crate::handler::expand(args, item) {
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}
