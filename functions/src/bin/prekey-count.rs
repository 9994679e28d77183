//! Lambda binary for `functions::prekey_count`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "prekey-count",
        common::Tokens::Used,
        functions::prekey_count::handler,
    )
    .await
}
