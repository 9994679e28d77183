//! Lambda binary for `functions::update_key`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "update-key",
        common::Tokens::Used,
        functions::update_key::handler,
    )
    .await
}
