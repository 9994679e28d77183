//! API Gateway HTTP API events (payload format 2.0) as AWS sends them to these functions: the
//! headers API Gateway adds, the route key and path parameters `routes::find` gives (or
//! `$default`, which goes to not-found), query parameters decoded with repeated names joined by
//! commas. The in-process tests and the bench both build their requests here, so both parse
//! what AWS sends and route as AWS routes.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::routes;

/// The client address API Gateway reports unless one is given (TEST-NET-3).
pub const DEFAULT_SOURCE_IP: &str = "203.0.113.7";

#[derive(Debug, Clone)]
pub struct ApiEvent {
    method: String,
    path_and_query: String,
    /// Lower-case names, at most one value each (API Gateway joins repeated headers).
    headers: Vec<(String, String)>,
    body: Option<String>,
    source_ip: String,
}

impl ApiEvent {
    pub fn new(method: &str, path_and_query: impl Into<String>) -> Self {
        let headers = [
            ("accept", "application/json"),
            ("host", "abcdef1234.execute-api.eu-west-1.amazonaws.com"),
            ("user-agent", "messenger-client/1.0"),
            (
                "x-amzn-trace-id",
                "Root=1-6750a3f0-2f1b6c0e5d4a39870b1c2d3e",
            ),
            ("x-forwarded-port", "443"),
            ("x-forwarded-proto", "https"),
        ];
        Self {
            method: method.to_string(),
            path_and_query: path_and_query.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: None,
            source_ip: DEFAULT_SOURCE_IP.to_string(),
        }
    }

    /// Sets a header, replacing any value it had.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// A JSON body, labelled `application/json` unless a content type was set already.
    pub fn json(mut self, body: Value) -> Self {
        if !self.headers.iter().any(|(n, _)| n == "content-type") {
            self = self.header("content-type", "application/json");
        }
        self.raw_body(&body.to_string())
    }

    /// A body exactly as given, headers untouched.
    pub fn raw_body(mut self, body: &str) -> Self {
        self.body = Some(body.to_string());
        self
    }

    pub fn source_ip(mut self, ip: &str) -> Self {
        self.source_ip = ip.to_string();
        self
    }

    /// The function API Gateway routes this request to, and the event JSON it sends.
    pub fn event(&self) -> (&'static str, String) {
        let (path, query) = self
            .path_and_query
            .split_once('?')
            .unwrap_or((&self.path_and_query, ""));
        let (route_key, function, path_params) = match routes::find(&self.method, path) {
            Ok(m) => (
                format!("{} {}", m.method, m.template),
                m.function,
                m.params.into_iter().collect::<BTreeMap<_, _>>(),
            ),
            Err(_) => ("$default".to_string(), "not-found", BTreeMap::new()),
        };
        let mut query_params: BTreeMap<String, String> = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(&value.replace('+', " "));
            query_params
                .entry(percent_decode(name))
                .and_modify(|joined| {
                    joined.push(',');
                    joined.push_str(&value);
                })
                .or_insert(value);
        }
        let mut headers: BTreeMap<&str, &str> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        headers.entry("x-forwarded-for").or_insert(&self.source_ip);
        let content_length = self.body.as_ref().map(|b| b.len().to_string());
        if let Some(length) = &content_length {
            headers.insert("content-length", length);
        }
        let user_agent = headers.get("user-agent").copied().unwrap_or_default();
        let mut event = json!({
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": path,
            "rawQueryString": query,
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "abcdef1234",
                "domainName": "abcdef1234.execute-api.eu-west-1.amazonaws.com",
                "domainPrefix": "abcdef1234",
                "http": {
                    "method": self.method,
                    "path": path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": self.source_ip,
                    "userAgent": user_agent,
                },
                "requestId": "Tz2bEjNzIAMEVhw=",
                "routeKey": route_key,
                "stage": "$default",
                "time": "28/Nov/2026:12:00:00 +0000",
                "timeEpoch": 1_795_867_200_000u64
            },
            "isBase64Encoded": false
        });
        if !query_params.is_empty() {
            event["queryStringParameters"] = json!(query_params);
        }
        if !path_params.is_empty() {
            event["pathParameters"] = json!(path_params);
        }
        if let Some(body) = &self.body {
            event["body"] = json!(body);
        }
        (function, event.to_string())
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use lambda_http::RequestExt;

    use super::*;

    #[test]
    fn parses_as_lambda_http_parses_api_gateway() {
        let (function, event) = ApiEvent::new("GET", "/messages?limit=5&after=a%2Bb&x=1&x=2")
            .bearer("t0ken")
            .source_ip("198.51.100.1")
            .event();
        assert_eq!(function, "get-messages");
        let request = lambda_http::request::from_str(&event).unwrap();
        let query = request.query_string_parameters();
        assert_eq!(query.first("limit"), Some("5"));
        assert_eq!(query.first("after"), Some("a+b"));
        // API Gateway joins repeated names with commas; lambda_http splits them again.
        assert_eq!(query.all("x"), Some(vec!["1", "2"]));
        assert_eq!(request.headers()["authorization"], "Bearer t0ken");
        assert_eq!(request.headers()["x-forwarded-for"], "198.51.100.1");
        assert_eq!(
            common::http::client_address(&request),
            "198.51.100.1".to_string()
        );
    }

    #[test]
    fn routes_as_api_gateway_does() {
        let (function, event) = ApiEvent::new("PUT", "/messages/abc/delivered").event();
        assert_eq!(function, "confirm-delivery");
        let request = lambda_http::request::from_str(&event).unwrap();
        assert_eq!(request.path_parameters().first("id"), Some("abc"));
        let (function, _) = ApiEvent::new("GET", "/nowhere").event();
        assert_eq!(function, "not-found");
    }

    #[test]
    fn a_json_body_keeps_a_content_type_set_before_it() {
        let (_, event) = ApiEvent::new("POST", "/register")
            .header("Content-Type", "text/plain")
            .json(json!({"a": 1}))
            .event();
        let request = lambda_http::request::from_str(&event).unwrap();
        assert_eq!(request.headers()["content-type"], "text/plain");
        assert_eq!(request.headers()["content-length"], "7");
    }
}
