//! Lambda binary for `functions::set_signing_key`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "set-signing-key",
        common::Tokens::Used,
        functions::set_signing_key::handler,
    )
    .await
}
