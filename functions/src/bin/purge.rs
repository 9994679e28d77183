//! Lambda binary for the scheduled purge (EventBridge, hourly).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let state = common::runtime::init("purge").await?;
    lambda_runtime::run(service_fn(
        |event: LambdaEvent<EventBridgeEvent>| async move {
            let remaining = Duration::from_millis(event.context.deadline).saturating_sub(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default(),
            );
            // Keep a margin before the Lambda deadline to record the run and return.
            let stop_by =
                Instant::now() + remaining.saturating_sub(functions::purge::DEADLINE_MARGIN);
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
