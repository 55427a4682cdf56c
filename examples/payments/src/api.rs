//! The HTTP API.

use crate::{App, PaymentCreated, Store};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use uuid::Uuid;

/// ISO 4217 codes the service accepts (lowercase, as in the seed's requests).
const CURRENCIES: &[&str] = &["usd", "eur", "gbp", "mxn", "cad", "jpy", "chf", "aud"];

/// The largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// The longest accepted value of each text field, in characters (422 beyond).
pub const MAX_FIELD_CHARS: &[(&str, usize)] = &[
    ("tokenCard", 64),
    ("cardHolderName", 200),
    // RFC 5321's limit on a forward path.
    ("cardHolderEmail", 254),
];

pub(crate) fn router<DB: Store>(app: Arc<App<DB>>) -> axum::Router {
    axum::Router::new()
        .route("/api/payment", post(create_payment::<DB>))
        .route(
            "/api/payment/status/{payment_id}",
            get(payment_status::<DB>),
        )
        // Every answer is the documented JSON error shape, also for what axum answers itself.
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

async fn no_route(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        None,
        format!("no route for {method} {}", uri.path()),
    )
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}

/// A JSON error: `{"error": "...", "field": "..."}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    field: Option<&'static str>,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        (self.status, Json(body)).into_response()
    }
}

fn error(status: StatusCode, field: Option<&'static str>, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        field,
        message: message.into(),
    }
}

/// Missing or mistyped fields are 400, values that break a rule 422; the field is named.
fn validate(body: &[u8]) -> Result<PaymentCreated, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            None,
            format!("body is not JSON: {e}"),
        )
    })?;
    let Value::Object(fields) = value else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            None,
            "body must be a JSON object",
        ));
    };
    let text = |fields: &Map<String, Value>, name: &'static str| -> Result<String, ApiError> {
        match fields.get(name) {
            None | Some(Value::Null) => Err(error(
                StatusCode::BAD_REQUEST,
                Some(name),
                format!("{name} is required"),
            )),
            Some(Value::String(s)) if s.trim().is_empty() => Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(name),
                format!("{name} must not be empty"),
            )),
            Some(Value::String(s)) => match too_long(name, s.trim()) {
                Some(max) => Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Some(name),
                    format!("{name} must be at most {max} characters"),
                )),
                None => Ok(s.trim().to_owned()),
            },
            Some(_) => Err(error(
                StatusCode::BAD_REQUEST,
                Some(name),
                format!("{name} must be a string"),
            )),
        }
    };
    let token_card = text(&fields, "tokenCard")?;
    let amount = match fields.get("amount") {
        None | Some(Value::Null) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                Some("amount"),
                "amount is required",
            ))
        }
        Some(Value::Number(n)) => match n.as_i64() {
            Some(a) if a > 0 => a,
            _ => {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Some("amount"),
                    "amount must be a positive whole number of minor units (cents)",
                ))
            }
        },
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                Some("amount"),
                "amount must be a number",
            ))
        }
    };
    let currency = text(&fields, "currency")?.to_lowercase();
    if !CURRENCIES.contains(&currency.as_str()) {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("currency"),
            format!(
                "unknown currency {currency:?}; accepted: {}",
                CURRENCIES.join(", ")
            ),
        ));
    }
    let card_holder_name = text(&fields, "cardHolderName")?;
    let card_holder_email = text(&fields, "cardHolderEmail")?;
    if !plausible_email(&card_holder_email) {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("cardHolderEmail"),
            "cardHolderEmail is not an e-mail address",
        ));
    }
    Ok(PaymentCreated {
        payment_id: Uuid::now_v7(),
        token_card,
        amount,
        currency,
        card_holder_name,
        card_holder_email,
    })
}

/// The limit `value` exceeds, if it has one and exceeds it.
fn too_long(field: &str, value: &str) -> Option<usize> {
    MAX_FIELD_CHARS
        .iter()
        .find(|(name, _)| *name == field)
        .map(|(_, max)| *max)
        .filter(|max| value.chars().count() > *max)
}

fn plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

async fn create_payment<DB: Store>(
    State(app): State<Arc<App<DB>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            "content-type must be application/json",
        )
        .into_response();
    }
    // Over MAX_BODY_BYTES (413), or a body that could not be read: axum's status, our shape.
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let message = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                format!("the body is larger than {MAX_BODY_BYTES} bytes")
            } else {
                rejection.body_text()
            };
            return error(rejection.status(), None, message).into_response();
        }
    };
    let payment = match validate(&body) {
        Ok(p) => p,
        Err(error) => return error.into_response(),
    };
    let stored = async {
        let mut tx = app.outbox.pool().begin().await.map_err(|e| e.to_string())?;
        DB::insert_payment(&mut *tx, &payment)
            .await
            .map_err(|e| e.to_string())?;
        app.outbox
            .enqueue(&mut *tx, &payment)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())
    }
    .await;
    match stored {
        Ok(()) => Json(json!({
            "message": "Payment request created successfully",
            "paymentId": payment.payment_id,
        }))
        .into_response(),
        Err(reason) => {
            tracing::error!(%reason, "storing a payment failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the payment could not be stored; try again",
            )
            .into_response()
        }
    }
}

async fn payment_status<DB: Store>(
    State(app): State<Arc<App<DB>>>,
    Path(payment_id): Path<String>,
) -> Response {
    let Ok(payment_id) = Uuid::parse_str(&payment_id) else {
        return error(
            StatusCode::BAD_REQUEST,
            Some("paymentId"),
            "paymentId is not a UUID",
        )
        .into_response();
    };
    match DB::payment(app.outbox.pool(), payment_id).await {
        Ok(Some(row)) => {
            let mut body = json!({ "paymentId": payment_id, "status": row.status });
            if let Some(reason) = row.failure_reason {
                body["failureReason"] = json!(reason);
            }
            Json(body).into_response()
        }
        Ok(None) => {
            error(StatusCode::NOT_FOUND, Some("paymentId"), "no such payment").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "reading a payment failed");
            error(StatusCode::SERVICE_UNAVAILABLE, None, "try again").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn emails() {
        for ok in ["a@b.co", "first.last@example.org"] {
            assert!(super::plausible_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@", "@b.co", "a@b", "a@@b.co", "a b@c.de", "a@.co", "a@b.",
        ] {
            assert!(!super::plausible_email(bad), "{bad}");
        }
    }
}
