//! Lambda binary for `functions::get_keys`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "get-keys",
        common::Tokens::Used,
        functions::get_keys::handler,
    )
    .await
}
