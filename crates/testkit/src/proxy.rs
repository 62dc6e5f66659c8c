//! A TCP proxy in front of Redis that can make subscriber connections go silent: the
//! connection stays open, but nothing Redis sends on it arrives any more — the failure a
//! health check that only looks at sockets cannot see.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

#[derive(Default)]
struct Conn {
    /// The client sent a SUBSCRIBE/SSUBSCRIBE on this connection.
    subscriber: AtomicBool,
    /// Redis → client bytes are dropped.
    silenced: AtomicBool,
}

/// A proxy to `127.0.0.1:{target}`; stops on drop.
pub struct RedisProxy {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
    task: JoinHandle<()>,
}

impl RedisProxy {
    /// Starts proxying a free port to `target`.
    pub async fn start(target: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let registry = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let conn = Arc::new(Conn::default());
                registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await {
                        pump(client, server, conn).await;
                    }
                });
            }
        });
        Ok(RedisProxy { port, conns, task })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{proxy port}`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Silences every subscriber connection open now; returns how many. New connections
    /// are not affected.
    pub fn silence_subscribers(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .filter(|c| c.subscriber.load(Ordering::SeqCst))
            .inspect(|c| c.silenced.store(true, Ordering::SeqCst))
            .count()
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(client: TcpStream, server: TcpStream, conn: Arc<Conn>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up_conn = conn.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if chunk
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
            {
                up_conn.subscriber.store(true, Ordering::SeqCst);
            }
            if sw.write_all(chunk).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if conn.silenced.load(Ordering::SeqCst) {
                continue;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
