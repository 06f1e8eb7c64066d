//! A controllable TCP relay on loopback, put between two tiers of a test
//! mesh to cut, stall, delay or slow a link. Cutting closes every open
//! connection and refuses new ones; stalling keeps connections open but
//! forwards nothing (a peer notices only by missed heartbeats); delay and
//! rate limits apply per chunk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward everything.
    Pass,
    /// Close connections and refuse new ones.
    Cut,
    /// Keep connections, forward nothing.
    Stall,
    /// Forward each chunk after a delay.
    Delay(Duration),
    /// Forward at most this many bytes per second.
    Slow(u64),
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    mode: watch::Sender<LinkMode>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay on `127.0.0.1:0` forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(target));
        let (mode, _) = watch::channel(LinkMode::Pass);
        let (t, m) = (target.clone(), mode.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let to = *t.lock().unwrap_or_else(|p| p.into_inner());
                let rx = m.subscribe();
                if *rx.borrow() == LinkMode::Cut {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pipe(cr, sw, rx.clone()));
                    let down = tokio::spawn(pipe(sr, cw, rx));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(Self {
            addr,
            target,
            mode,
            task,
        })
    }

    /// Changes what the relay does (applies to open connections too).
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// Points the relay at another target (for new connections).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// The current mode.
    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.mode.send_replace(LinkMode::Cut);
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // wait while stalled; end when cut
        loop {
            let m = *mode.borrow_and_update();
            match m {
                LinkMode::Cut => return,
                LinkMode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            r = mode.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        let current = *mode.borrow();
        match current {
            LinkMode::Delay(d) => tokio::time::sleep(d).await,
            LinkMode::Slow(bps) if bps > 0 => {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
            }
            LinkMode::Cut => return,
            _ => {}
        }
        // a stall that began while this chunk was read holds it back
        loop {
            let current = *mode.borrow();
            if current != LinkMode::Stall {
                break;
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        let current = *mode.borrow();
        if current == LinkMode::Cut || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_cuts_and_stalls() -> std::io::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let target = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let relay = Relay::start(target).await?;
        let mut c = TcpStream::connect(relay.addr).await?;
        c.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await?;
        assert_eq!(&b, b"ping");

        relay.set(LinkMode::Stall);
        c.write_all(b"held").await?;
        let stalled = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut b)).await;
        assert!(stalled.is_err(), "a stalled link forwarded data");
        relay.set(LinkMode::Pass);
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b)).await??;
        assert_eq!(&b, b"held");

        relay.set(LinkMode::Cut);
        let mut gone = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut gone)).await?;
        assert!(matches!(r, Ok(0) | Err(_)), "a cut link stayed open");
        Ok(())
    }
}
