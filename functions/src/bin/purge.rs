//! Lambda binary for the scheduled purge (EventBridge, hourly).

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let state = common::runtime::init("purge", common::Tokens::Unused)?;
    lambda_runtime::run_concurrent(service_fn(
        move |event: LambdaEvent<EventBridgeEvent>| async move {
            let time_left = functions::purge::time_left(event.context.deadline);
            tracing::debug!(time_left_ms = time_left.as_millis() as u64, "purge invoked");
            let stop_by = functions::purge::stop_by(time_left);
            functions::purge::purge(state, stop_by, functions::purge::DEFAULT_BATCH_SIZE)
                .await
                .map_err(|error| {
                    tracing::error!(error = %error, "purge failed");
                    common::db::short_reason(&error)
                })
        },
    ))
    .await
}
