//! A minimal AWS Lambda Runtime API (2018-06-01) on a tokio TcpListener: enough for
//! `lambda_runtime` to start, poll, and answer, so a release binary can be run as Lambda runs it.
//!
//! `GET /runtime/invocation/next` long-polls for the next queued event; the function's answers
//! (`/response`, `/error`, `/init/error`) are reported to the driver with the instant they
//! arrived.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

const PREFIX: &str = "/2018-06-01/runtime/";

/// What the function did, and when the server saw it.
#[derive(Debug)]
pub enum Report {
    /// A `next` poll arrived (the function is initialised and waiting).
    Next(Instant),
    Response(Instant, Vec<u8>),
    Error(Vec<u8>),
    InitError(Vec<u8>),
}

struct Shared {
    events: Mutex<mpsc::UnboundedReceiver<String>>,
    reports: mpsc::UnboundedSender<Report>,
    arn: String,
}

pub struct RuntimeApi {
    pub address: String,
    events: mpsc::UnboundedSender<String>,
    reports: mpsc::UnboundedReceiver<Report>,
    server: JoinHandle<()>,
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl RuntimeApi {
    pub async fn start(function: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            events: Mutex::new(events_rx),
            reports: reports_tx,
            arn: format!("arn:aws:lambda:us-east-1:123456789012:function:{function}"),
        });
        let server = tokio::spawn(async move {
            // Dropping the JoinSet (when the server task is aborted) aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                connections.spawn(serve(stream, shared.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            address,
            events: events_tx,
            reports: reports_rx,
            server,
        })
    }

    /// Queues an invocation; the next `next` poll receives it.
    pub fn invoke(&self, event: String) {
        let _ = self.events.send(event);
    }

    pub async fn report(&mut self, timeout: Duration) -> Option<Report> {
        tokio::time::timeout(timeout, self.reports.recv())
            .await
            .ok()
            .flatten()
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let mut request_id: u64 = 0;
    loop {
        // Request line and headers.
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let arrived = Instant::now();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut content_length = 0usize;
        let mut chunked = false;
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        let body = if chunked {
            match read_chunked(&mut reader).await {
                Some(body) => body,
                None => return,
            }
        } else {
            let mut body = vec![0; content_length];
            if reader.read_exact(&mut body).await.is_err() {
                return;
            }
            body
        };

        let route = path.strip_prefix(PREFIX).unwrap_or(&path);
        let reply = if method == "GET" && route == "invocation/next" {
            let _ = shared.reports.send(Report::Next(arrived));
            let Some(event) = shared.events.lock().await.recv().await else {
                return;
            };
            request_id += 1;
            next_reply(&shared.arn, request_id, &event)
        } else if method == "POST" && route.starts_with("invocation/") {
            let report = if route.ends_with("/response") {
                Report::Response(arrived, body)
            } else {
                Report::Error(body)
            };
            let _ = shared.reports.send(report);
            accepted()
        } else if method == "POST" && route == "init/error" {
            let _ = shared.reports.send(Report::InitError(body));
            accepted()
        } else {
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

async fn read_chunked<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.ok()?;
        let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                line.clear();
                if reader.read_line(&mut line).await.ok()? == 0 || line.trim().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size + 2, 0);
        reader.read_exact(&mut body[start..]).await.ok()?;
        body.truncate(start + size);
    }
}

fn next_reply(arn: &str, request_id: u64, event: &str) -> Vec<u8> {
    let deadline_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        + 30_000;
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\n\
         content-type: application/json\r\n\
         lambda-runtime-aws-request-id: 00000000-0000-4000-8000-{request_id:012x}\r\n\
         lambda-runtime-deadline-ms: {deadline_ms}\r\n\
         lambda-runtime-invoked-function-arn: {arn}\r\n\
         lambda-runtime-trace-id: Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0\r\n\
         content-length: {}\r\n\r\n",
        event.len()
    )
    .into_bytes();
    reply.extend_from_slice(event.as_bytes());
    reply
}

fn accepted() -> Vec<u8> {
    let body = r#"{"status":"OK"}"#;
    format!(
        "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
