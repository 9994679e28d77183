//! The route table, the one source of every route: `ROUTES` and `crate::dispatch` are expanded
//! from it here, and `make routes` (scripts/routes.py) writes the `cargo lambda watch` router in
//! Cargo.toml from it and checks template.yaml's and openapi.yaml's routes against it.
//!
//! Adding an endpoint: a handler module, a 5-line binary in `src/bin/`, one line below, then
//! `make routes` (docs/DESIGN.md, "How to add an endpoint").

use common::AppState;
use common::runtime::HandlerResult;
use lambda_http::Request;

use crate::*;

/// `"function" => handler: METHOD "/path", ...;` per Lambda function (a binary name).
macro_rules! routes {
    ($($function:literal => $handler:path: $($method:ident $path:literal),+;)*) => {
        /// (method, path template, function).
        pub const ROUTES: &[(&str, &str, &str)] = &[
            $($((stringify!($method), $path, $function),)+)*
        ];

        /// Runs the HTTP function named `function`. Each binary calls its own handler directly;
        /// this is for tests and tools that address functions by name. Anything else is the
        /// fallback, `not-found`.
        pub async fn dispatch(
            function: &str,
            state: &'static AppState,
            request: Request,
        ) -> HandlerResult {
            match function {
                $($function => $handler(state, request).await,)*
                _ => not_found::handler(state, request).await,
            }
        }
    };
}

routes! {
    "register" => register::handler: POST "/register";
    "login" => login::handler: POST "/login";
    "me" => me::handler: GET "/me";
    "delete-account" => delete_account::handler: DELETE "/me";
    "get-public-key" => get_public_key::handler: GET "/public-key/{user_id}";
    "update-key" => update_key::handler: PUT "/update-key";
    "lookup-user" => lookup_user::handler: GET "/users";
    "health" => health::handler: GET "/health", GET "/health/ready";
    "send-message" => send_message::handler: POST "/messages";
    "get-messages" => get_messages::handler: GET "/messages";
    "confirm-delivery" => confirm_delivery::handler: PUT "/messages/{id}/delivered";
    "confirm-deliveries" => confirm_deliveries::handler: POST "/messages/delivered";
    "metrics" => metrics::handler: GET "/metrics";
    "create-link-code" => create_link_code::handler: POST "/devices/link-codes";
    "link-device" => link_device::handler: POST "/devices";
    "my-devices" => my_devices::handler: GET "/me/devices";
    "user-devices" => user_devices::handler: GET "/users/{user_id}/devices";
    "remove-device" => remove_device::handler: DELETE "/devices/{device_id}";
    "send-to-devices" => send_to_devices::handler: POST "/messages/devices";
    "set-signing-key" => set_signing_key::handler: PUT "/keys/signing-key";
    "upload-prekeys" => upload_prekeys::handler: POST "/keys/prekeys";
    "prekey-count" => prekey_count::handler: GET "/keys/prekeys/count";
    "get-keys" => get_keys::handler: GET "/keys/{user_id}";
    "claim-prekeys" => claim_prekeys::handler: POST "/keys/claim";
}

/// A matched route: its template, function and path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub method: &'static str,
    pub template: &'static str,
    pub function: &'static str,
    pub params: Vec<(String, String)>,
}

/// The route for `method` and `path`, or `Err` with the methods the path does allow (empty when
/// no route has this path at all). A path that a template matches with fewer parameters belongs
/// to that template alone: `/keys/claim` is the claim's path (POST), never a `{user_id}` of
/// `GET /keys/{user_id}`, so `GET /keys/claim` is 405 with `Allow: POST`.
pub fn find(method: &str, path: &str) -> Result<RouteMatch, Vec<&'static str>> {
    let matches: Vec<_> = ROUTES
        .iter()
        .filter_map(|&(route_method, template, function)| {
            match_template(template, path).map(|params| (route_method, template, function, params))
        })
        .collect();
    let fewest = matches.iter().map(|m| m.3.len()).min().unwrap_or(0);
    let mut allowed = Vec::new();
    for (route_method, template, function, params) in matches {
        if params.len() > fewest {
            continue;
        }
        if route_method.eq_ignore_ascii_case(method) {
            return Ok(RouteMatch {
                method: route_method,
                template,
                function,
                params,
            });
        }
        allowed.push(route_method);
    }
    Err(allowed)
}

/// For a handler of a template with a parameter: API Gateway picks a route per method, so
/// `GET /keys/claim` reaches `GET /keys/{user_id}` although `/keys/claim` is a path of its own.
/// Such a request is 405 with the methods that path has, as the fallback answers it locally.
pub fn refuse_shadowed(request: &Request) -> Result<(), common::ApiError> {
    match find(request.method().as_str(), request.uri().path()) {
        Err(allowed) if !allowed.is_empty() => Err(common::ApiError::MethodNotAllowed {
            allow: allowed.join(", "),
        }),
        _ => Ok(()),
    }
}

fn match_template(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    // Exact segments, as API Gateway matches them: "/me/" is not "/me".
    let mut template_parts = template.split('/');
    let mut path_parts = path.split('/');
    let mut params = Vec::new();
    loop {
        match (template_parts.next(), path_parts.next()) {
            (None, None) => return Some(params),
            (Some(t), Some(p)) if t.starts_with('{') && t.ends_with('}') && !p.is_empty() => {
                params.push((t[1..t.len() - 1].to_string(), p.to_string()));
            }
            (Some(t), Some(p)) if t == p => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_templates() {
        let m = find("PUT", "/messages/abc/delivered").unwrap();
        assert_eq!(m.function, "confirm-delivery");
        assert_eq!(m.params, [("id".to_string(), "abc".to_string())]);
        assert_eq!(find("GET", "/messages").unwrap().function, "get-messages");
        assert_eq!(find("POST", "/messages").unwrap().function, "send-message");
        assert_eq!(find("GET", "/health/ready").unwrap().function, "health");
        assert_eq!(find("DELETE", "/messages").unwrap_err(), ["POST", "GET"]);
        assert!(find("GET", "/nope").unwrap_err().is_empty());
        assert!(find("PUT", "/messages//delivered").unwrap_err().is_empty());
        assert!(find("GET", "/public-key/a/b").unwrap_err().is_empty());
        assert!(find("GET", "/me/").unwrap_err().is_empty());
        assert_eq!(find("DELETE", "/me").unwrap().function, "delete-account");
        assert_eq!(
            find("POST", "/messages/delivered").unwrap().function,
            "confirm-deliveries"
        );
        assert_eq!(find("GET", "/messages/delivered").unwrap_err(), ["POST"]);
        // A literal path is never a parameter of a sibling template.
        assert_eq!(find("GET", "/keys/claim").unwrap_err(), ["POST"]);
        assert_eq!(find("GET", "/keys/signing-key").unwrap_err(), ["PUT"]);
        assert_eq!(find("GET", "/keys/prekeys").unwrap_err(), ["POST"]);
        assert_eq!(find("DELETE", "/devices/link-codes").unwrap_err(), ["POST"]);
        assert_eq!(find("GET", "/keys/abc").unwrap().function, "get-keys");
        assert_eq!(
            find("DELETE", "/devices/7").unwrap().function,
            "remove-device"
        );
        assert_eq!(
            find("GET", "/keys/prekeys/count").unwrap().function,
            "prekey-count"
        );
    }
}
