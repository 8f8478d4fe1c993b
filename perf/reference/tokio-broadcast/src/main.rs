//! Reference broadcast server: tokio (one thread) + tokio-tungstenite, one reader and one
//! writer task per connection; the writer sends everything queued in one write. Every text
//! message is sent to every connection. Usage: tokio-broadcast PORT [READ_BUFFER_BYTES]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

type Clients = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8081);
    let read_buffer: Option<usize> = args.next().and_then(|b| b.parse().ok());
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    println!("tokio-broadcast listening on ws://127.0.0.1:{port}/");
    let clients: Clients = Arc::default();
    let mut next_id = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let (id, clients) = (next_id, clients.clone());
        tokio::spawn(async move {
            let mut config = WebSocketConfig::default();
            if let Some(size) = read_buffer {
                config = config.read_buffer_size(size);
            }
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
                return;
            };
            let (mut sink, mut source) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            clients.lock().unwrap().insert(id, tx);
            let writer = tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    if sink.feed(first).await.is_err() {
                        return;
                    }
                    while let Ok(more) = rx.try_recv() {
                        if sink.feed(more).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
            while let Some(Ok(msg)) = source.next().await {
                if msg.is_text() {
                    for tx in clients.lock().unwrap().values() {
                        let _ = tx.send(msg.clone());
                    }
                }
            }
            clients.lock().unwrap().remove(&id);
            writer.abort();
        });
    }
}
