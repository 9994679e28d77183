//! Lambda binary for `functions::get_public_key`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "get-public-key",
        common::Tokens::Used,
        functions::get_public_key::handler,
    )
    .await
}
