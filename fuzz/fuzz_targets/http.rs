//! The bytes a client sends to `run --metrics`, served by the service's own connection
//! handler (hyper, its timeouts, the Host check): never panics, and every connection ends.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use isolation_user::{
    service::{Health, MetricsServer},
    state::Paths,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn server() -> &'static MetricsServer {
    static S: OnceLock<MetricsServer> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("isolation-fuzz-http-{}", std::process::id()));
        MetricsServer::new(
            Paths {
                pin_dir: dir.join("pins"),
                state_dir: dir,
            },
            Arc::new(Mutex::new(Health::default())),
            true,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    runtime().block_on(async move {
        let (mut client, served) = tokio::io::duplex(1 << 16);
        let serve = server().serve(served);
        let talk = async move {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
        };
        let ended = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            tokio::join!(serve, talk)
        })
        .await;
        assert!(ended.is_ok(), "a connection outlived its lifetime");
    });
});
