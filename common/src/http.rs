//! Request helpers shared by every HTTP function: the body, the caller, the client address,
//! path and query values, each refused with the contract's `ApiError`.

use std::cell::Cell;
use std::net::{IpAddr, Ipv6Addr};

use lambda_http::http::header;
use lambda_http::request::RequestContext;
use lambda_http::{Request, RequestExt};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::ApiError;
use crate::jwt::JwtKeys;

/// The top-level fields of a JSON object body. Unknown fields are ignored (clients may be newer
/// than the server); duplicate keys are refused, since two parsers could read them differently.
#[derive(Debug)]
pub struct JsonObject(Map<String, Value>);

impl JsonObject {
    /// A required string field: absent or null is 422, another JSON type is 400.
    pub fn required_str(&self, field: &'static str) -> Result<&str, ApiError> {
        self.required(field, "a string", Value::as_str)
    }

    /// A required array field: absent or null is 422, another JSON type is 400.
    pub fn required_array(&self, field: &'static str) -> Result<&[Value], ApiError> {
        self.required(field, "an array", |v| v.as_array().map(Vec::as_slice))
    }

    /// An optional string field: absent or null is None, another JSON type is 400.
    pub fn optional_str(&self, field: &'static str) -> Result<Option<&str>, ApiError> {
        self.optional(field, "a string", Value::as_str)
    }

    /// A required whole number in `min..=max`: absent or null is 422, not a whole number 400,
    /// out of range 422.
    pub fn required_int(&self, field: &'static str, min: i64, max: i64) -> Result<i64, ApiError> {
        self.optional_int(field, min, max)?
            .ok_or_else(|| ApiError::validation(field, format!("{field} is required")))
    }

    /// An optional whole number in `min..=max`: absent or null is None, not a whole number 400,
    /// out of range 422.
    pub fn optional_int(
        &self,
        field: &'static str,
        min: i64,
        max: i64,
    ) -> Result<Option<i64>, ApiError> {
        let Some(value) = self.optional(field, "a whole number", json_integer)? else {
            return Ok(None);
        };
        value
            .filter(|v| (min..=max).contains(v))
            .map(Some)
            .ok_or_else(|| {
                ApiError::validation(field, format!("{field} must be between {min} and {max}"))
            })
    }

    /// Any field as it is, absent or null as None (for nested objects and arrays of them).
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn optional<'a, T>(
        &'a self,
        field: &'static str,
        kind: &str,
        as_kind: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => as_kind(value)
                .map(Some)
                .ok_or_else(|| ApiError::bad_field(field, format!("{field} must be {kind}"))),
        }
    }

    fn required<'a, T>(
        &'a self,
        field: &'static str,
        kind: &str,
        as_kind: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<T, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => {
                Err(ApiError::validation(field, format!("{field} is required")))
            }
            Some(value) => as_kind(value)
                .ok_or_else(|| ApiError::bad_field(field, format!("{field} must be {kind}"))),
        }
    }
}

/// A JSON number that is a whole number: `Some(Some(n))`; a whole number past i64 (always out of
/// any range asked): `Some(None)`; not a whole number at all: None. `1.0` is a whole number.
pub fn json_integer(value: &Value) -> Option<Option<i64>> {
    let number = value.as_number()?;
    if let Some(n) = number.as_i64() {
        return Some(Some(n));
    }
    if number.as_u64().is_some() {
        return Some(None);
    }
    let f = number.as_f64()?;
    (f.fract() == 0.0).then(|| (f.abs() < 9.0e15).then_some(f as i64))
}

/// Parses the body as a JSON object. Not JSON, not an object, or a non-JSON content type is 400;
/// a body over `max_bytes` is 413 and is not parsed.
pub fn json_body(request: &Request, max_bytes: usize) -> Result<JsonObject, ApiError> {
    if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::bad_request(
                "Content-Type must be application/json",
            ));
        }
    }
    let bytes: &[u8] = request.body().as_ref();
    if bytes.len() > max_bytes {
        return Err(ApiError::PayloadTooLarge {
            message: format!("request body must be at most {max_bytes} bytes"),
            field: None,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    let duplicate = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let object = de
        .deserialize_any(ObjectVisitor {
            duplicate: &duplicate,
        })
        .and_then(|object| de.end().map(|()| object))
        .map_err(|e| match duplicate.take() {
            Some(key) => ApiError::bad_request(format!("duplicate field `{key}`")),
            None if e.is_data() => ApiError::bad_request("request body must be a JSON object"),
            None => ApiError::bad_request("request body is not valid JSON"),
        })?;
    Ok(JsonObject(object))
}

/// Reads a JSON object, refusing a key it has seen: the key goes to `duplicate`, so the caller
/// tells this refusal from a syntax error without reading error text.
struct ObjectVisitor<'a> {
    duplicate: &'a Cell<Option<String>>,
}

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                self.duplicate.set(Some(key));
                return Err(serde::de::Error::custom("duplicate field"));
            }
            let value: Value = access.next_value()?;
            map.insert(key, value);
        }
        Ok(map)
    }
}

/// Who calls: an account and one of its devices, as the token names them. Whether the device
/// still exists is checked by each endpoint's own statement (no extra round trip): a removed
/// device's or deleted account's token is 401 there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    /// Positive; the database's `integer`.
    pub device_id: i32,
}

/// The caller from `Authorization: Bearer <jwt>`; anything else is 401. A token without `dev`
/// is device 1's.
pub fn authenticate(request: &Request, jwt: &JwtKeys) -> Result<Caller, ApiError> {
    caller_of(request.headers().get(header::AUTHORIZATION), jwt)
}

/// The caller an `Authorization` header value names, as `authenticate` reads it.
pub fn caller_of(
    authorization: Option<&lambda_http::http::HeaderValue>,
    jwt: &JwtKeys,
) -> Result<Caller, ApiError> {
    let value = authorization
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    let token = bearer_token(value).ok_or(ApiError::Unauthorized)?;
    let claims = jwt.verify(token)?;
    Ok(Caller {
        user_id: claims.sub,
        // verify() refuses 0 and ids past i32::MAX.
        device_id: claims.dev.map_or(1, |dev| dev as i32),
    })
}

/// Requires `Authorization: Bearer <expected>` for a static token (e.g. `METRICS_TOKEN`),
/// compared in constant time.
pub fn authenticate_static(
    request: &Request,
    expected: &crate::secret::Secret<String>,
) -> Result<(), ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthorized)?;
    // Constant time over the bytes (`subtle`); only the length can be learned from timing.
    if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The token of a `Bearer` authorization value (scheme case-insensitive, per RFC 6750).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The client address as API Gateway saw it, as rate limits key it. Never taken from
/// `X-Forwarded-For`, which the client controls.
pub fn client_address(request: &Request) -> String {
    let ip = match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.http.source_ip.as_deref(),
        _ => None,
    };
    ip.filter(|ip| !ip.is_empty())
        .map_or_else(|| "unknown".to_string(), address_key)
}

/// An IPv4 address as it is; an IPv6 one by its /64 prefix, since one host or home usually
/// holds a whole /64 and could otherwise rotate through 2^64 addresses to escape a limit.
pub fn address_key(ip: &str) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                format!("{}/64", Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
        Err(_) => ip.to_string(),
    }
}

pub fn path_param(request: &Request, name: &str) -> Option<String> {
    request
        .path_parameters_ref()
        .and_then(|params| params.first(name))
        .map(str::to_owned)
}

pub fn query_param(request: &Request, name: &str) -> Option<String> {
    request
        .query_string_parameters_ref()
        .and_then(|params| params.first(name))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lambda_http::Body;

    fn request(body: &str, content_type: Option<&str>) -> Request {
        let mut builder = lambda_http::http::Request::builder()
            .method("POST")
            .uri("/x");
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        builder.body(Body::Text(body.to_string())).unwrap()
    }

    fn status(r: Result<JsonObject, ApiError>) -> u16 {
        r.err().map_or(200, |e| e.status().as_u16())
    }

    #[test]
    fn bodies() {
        let ok = json_body(
            &request(r#"{"name":"x","extra":1}"#, Some("application/json")),
            1000,
        )
        .unwrap();
        assert_eq!(ok.required_str("name").unwrap(), "x");
        assert_eq!(
            ok.required_str("missing").unwrap_err().status().as_u16(),
            422
        );
        assert_eq!(ok.required_str("extra").unwrap_err().status().as_u16(), 400);
        let null = json_body(&request(r#"{"name":null}"#, None), 1000).unwrap();
        assert_eq!(
            null.required_str("name").unwrap_err().status().as_u16(),
            422
        );
        assert!(
            json_body(
                &request("{}", Some("application/json; charset=utf-8")),
                1000
            )
            .is_ok()
        );
        assert!(json_body(&request("{}", Some("application/vnd.api+json")), 1000).is_ok());
        for bad in [
            "",
            "  ",
            "nope",
            "[1,2]",
            "\"s\"",
            "42",
            "null",
            "{\"a\":1",
            "{} {}",
            "{\"a\":1,\"a\":2}",
        ] {
            assert_eq!(status(json_body(&request(bad, None), 1000)), 400, "{bad:?}");
        }
        assert_eq!(
            status(json_body(&request("{}", Some("text/plain")), 1000)),
            400
        );
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(status(json_body(&request(&deep, None), 100_000)), 400);
        assert_eq!(
            status(json_body(
                &request(&format!("{{\"a\":\"{}\"}}", "x".repeat(2000)), None),
                1000
            )),
            413
        );
    }

    #[test]
    fn addresses_key_ipv6_by_prefix() {
        assert_eq!(address_key("203.0.113.7"), "203.0.113.7");
        assert_eq!(address_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            address_key("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            "2001:db8:1:2::/64"
        );
        assert_ne!(address_key("2001:db8:1:3::1"), "2001:db8:1:2::/64");
        assert_eq!(address_key("::ffff:198.51.100.1"), "198.51.100.1");
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
