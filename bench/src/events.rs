//! API Gateway HTTP API (payload format 2.0) events as API Gateway sends them, with the headers
//! it adds, so parsing them costs what it costs in AWS.

use std::collections::BTreeMap;

use serde_json::{Value, json};

pub struct Request {
    pub method: &'static str,
    pub path_and_query: String,
    pub bearer: Option<String>,
    pub body: Option<String>,
    pub source_ip: String,
}

impl Request {
    pub fn new(method: &'static str, path_and_query: impl Into<String>) -> Self {
        Self {
            method,
            path_and_query: path_and_query.into(),
            bearer: None,
            body: None,
            source_ip: "203.0.113.7".into(),
        }
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_string());
        self
    }

    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body.to_string());
        self
    }

    pub fn source_ip(mut self, ip: String) -> Self {
        self.source_ip = ip;
        self
    }

    /// The function API Gateway routes this request to, and the event it sends.
    pub fn event(&self) -> (&'static str, String) {
        let (path, query) = self
            .path_and_query
            .split_once('?')
            .unwrap_or((&self.path_and_query, ""));
        let (route_key, function, params) = match functions::routes::find(self.method, path) {
            Ok(m) => (format!("{} {}", m.method, m.template), m.function, m.params),
            Err(_) => ("$default".to_string(), "not-found", Vec::new()),
        };
        let mut headers: BTreeMap<&str, String> = BTreeMap::new();
        headers.insert("accept", "application/json".into());
        headers.insert("accept-encoding", "gzip, deflate, br".into());
        headers.insert(
            "host",
            "abcdef1234.execute-api.us-east-1.amazonaws.com".into(),
        );
        headers.insert("user-agent", "messenger-client/1.0".into());
        headers.insert(
            "x-amzn-trace-id",
            "Root=1-6750a3f0-2f1b6c0e5d4a39870b1c2d3e".into(),
        );
        headers.insert("x-forwarded-for", self.source_ip.clone());
        headers.insert("x-forwarded-port", "443".into());
        headers.insert("x-forwarded-proto", "https".into());
        if let Some(token) = &self.bearer {
            headers.insert("authorization", format!("Bearer {token}"));
        }
        if let Some(body) = &self.body {
            headers.insert("content-type", "application/json".into());
            headers.insert("content-length", body.len().to_string());
        }
        let mut event = json!({
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": path,
            "rawQueryString": query,
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "abcdef1234",
                "domainName": "abcdef1234.execute-api.us-east-1.amazonaws.com",
                "domainPrefix": "abcdef1234",
                "http": {
                    "method": self.method,
                    "path": path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": self.source_ip,
                    "userAgent": "messenger-client/1.0"
                },
                "requestId": "Tz2bEjNzIAMEVhw=",
                "routeKey": route_key,
                "stage": "$default",
                "time": "28/Nov/2026:12:00:00 +0000",
                "timeEpoch": 1_795_867_200_000u64
            },
            "isBase64Encoded": false
        });
        if !query.is_empty() {
            let params: BTreeMap<&str, &str> = query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .collect();
            event["queryStringParameters"] = json!(params);
        }
        if !params.is_empty() {
            event["pathParameters"] = json!(params.into_iter().collect::<BTreeMap<_, _>>());
        }
        if let Some(body) = &self.body {
            event["body"] = json!(body);
        }
        (function, event.to_string())
    }
}
