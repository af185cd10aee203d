//! Opens a TCP port through the host agent, serves a one-line HTTP answer on it, and releases
//! the opening on Ctrl-C (or SIGTERM).
//!
//! ```text
//! cargo run -p fwnp-sdk --example serve -- 8080 [SECONDS]
//! curl http://HOST:8080/     # from a network the gateway's policy allows
//! ```
//!
//! The socket is bound before the opening is asked for: the agent may check that the port
//! belongs to the process that asks.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use fwnp_sdk::{Client, Opening};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error's text tells the user what to do; its Debug form, which returning the
            // error from main would print, does not.
            eprintln!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .as_deref()
        .unwrap_or("8080")
        .parse()
        .map_err(|e| format!("the port: {e}"))?;
    let lifetime = Duration::from_secs(
        args.next()
            .as_deref()
            .unwrap_or("600")
            .parse()
            .map_err(|e| format!("the lifetime in seconds: {e}"))?,
    );

    let listener = TcpListener::bind(("::", port)).await?;
    let client = Client::connect().await?;
    let mut lease = client
        .open(
            Opening::tcp(port)
                .lifetime(lifetime)
                .name("fwnp-serve-example"),
        )
        .await?;
    println!(
        "lease {}: serving on tcp/{port} for {:?} at a time, renewed by the agent; Ctrl-C to stop",
        lease.id(),
        lease.lifetime()
    );

    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut stream, peer) = accepted?;
                tokio::spawn(async move {
                    // Read the request head (bounded), answer, close.
                    let mut request = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
                    let body = format!("hello {peer} from behind an FWNP opening\n");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
            Some(event) = lease.next_event() => {
                eprintln!("lease {}: {event}", lease.id());
                if event.is_terminal() {
                    return Ok(());
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    let id = lease.id();
    lease.release().await?;
    println!("released lease {id}");
    Ok(())
}
