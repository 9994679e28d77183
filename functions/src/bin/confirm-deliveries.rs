//! Lambda binary for `functions::confirm_deliveries`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http("confirm-deliveries", functions::confirm_deliveries::handler).await
}
