//! Lambda binary for `functions::confirm_delivery`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    common::runtime::run_http(
        "confirm-delivery",
        common::Tokens::Used,
        functions::confirm_delivery::handler,
    )
    .await
}
