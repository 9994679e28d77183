//! Lambda binary for `functions::not_found`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "not-found",
        common::Tokens::Unused,
        functions::not_found::handler,
    )
    .await
}
