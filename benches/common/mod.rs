//! What the view-change benchmarks share: the change itself, latency quantiles and this
//! machine's loopback TCP throughput (the ceiling a migration's MB/s is put beside).

use std::time::{Duration, Instant};

/// Changes the cluster's view to `view` through the node at `at` (`PUT /kvs/view-change`,
/// which must answer 200); returns how long it took.
pub async fn change_view(client: &reqwest::Client, at: &str, view: &[String]) -> Duration {
    let begun = Instant::now();
    let answer = client
        .put(format!("http://{at}/kvs/view-change"))
        .json(&serde_json::json!({ "view": view.join(",") }))
        .send()
        .await
        .unwrap();
    let wall = begun.elapsed();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    wall
}

/// The `q` quantile of sorted latencies, in ms.
pub fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    let at = ((sorted.len().saturating_sub(1)) as f64 * q).round() as usize;
    sorted.get(at).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// This machine's loopback TCP throughput (MB/s): one connection, 64 KiB writes, 1 s.
pub async fn loopback_mb_per_s() -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let (mut buffer, mut total) = (vec![0u8; 1 << 16], 0u64);
        while let Ok(n) = socket.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let chunk = vec![7u8; 1 << 16];
    let begun = Instant::now();
    while begun.elapsed() < Duration::from_secs(1) {
        socket.write_all(&chunk).await.unwrap();
    }
    drop(socket);
    let total = reader.await.unwrap();
    total as f64 / begun.elapsed().as_secs_f64() / 1e6
}
