//! Lambda binary for `functions::claim_prekeys`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "claim-prekeys",
        common::Tokens::Used,
        functions::claim_prekeys::handler,
    )
    .await
}
