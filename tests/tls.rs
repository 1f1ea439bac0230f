//! Real QUIC handshakes on 127.0.0.1 exercising the TLS policy of
//! `agentreg::transport::tls`: which clients get in, and as what.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentreg::transport::tls::{
    agent_client_config, agent_client_config_from_file, classify, generate_dev_material,
    write_dev_material, ConnectionKind, DevMaterial, NodeTls, TlsError, TlsFiles, ALPN_PEER,
    DEFAULT_SERVER_NAME,
};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::Endpoint;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Generous: every step here normally takes milliseconds.
const DEADLINE: Duration = Duration::from_secs(10);

/// What the test server saw for one incoming connection.
#[derive(Debug)]
enum ServerEvent {
    /// The handshake completed and `classify` returned this.
    Classified(Result<ConnectionKind, String>),
    /// The handshake failed.
    HandshakeFailed(String),
}

struct TestServer {
    _endpoint: Endpoint,
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<ServerEvent>,
}

impl TestServer {
    async fn next_event(&mut self) -> ServerEvent {
        timeout(DEADLINE, self.events.recv())
            .await
            .expect("server event timed out")
            .expect("server task ended")
    }

    fn assert_no_more_events(&mut self) {
        assert!(
            self.events.try_recv().is_err(),
            "server saw an unexpected extra connection"
        );
    }
}

/// Starts a node endpoint that classifies every connection, echoes
/// bidirectional streams on accepted ones and closes rejected ones.
fn start_server(tls: &NodeTls) -> TestServer {
    let endpoint = Endpoint::server(
        tls.server_config(agentreg::transport::tls::IDLE_TIMEOUT)
            .expect("server config"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .expect("bind server");
    let addr = endpoint.local_addr().unwrap();
    let (tx, events) = mpsc::unbounded_channel();
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(err) => {
                        let _ = tx.send(ServerEvent::HandshakeFailed(err.to_string()));
                        return;
                    }
                };
                match classify(&conn) {
                    Ok(kind) => {
                        let _ = tx.send(ServerEvent::Classified(Ok(kind)));
                        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            tokio::spawn(async move {
                                if let Ok(data) = recv.read_to_end(1 << 16).await {
                                    let _ = send.write_all(&data).await;
                                    let _ = send.finish();
                                }
                            });
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(ServerEvent::Classified(Err(err.to_string())));
                        conn.close(1u32.into(), b"rejected");
                    }
                }
            });
        }
    });
    TestServer {
        _endpoint: endpoint,
        addr,
        events,
    }
}

/// Connects with `config`; the endpoint is returned to keep it alive.
async fn connect(
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> (Endpoint, Result<quinn::Connection, String>) {
    let endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("bind client");
    let connecting = endpoint
        .connect_with(config, addr, DEFAULT_SERVER_NAME)
        .expect("start connecting");
    let result = timeout(DEADLINE, connecting)
        .await
        .expect("connect timed out")
        .map_err(|err| err.to_string());
    (endpoint, result)
}

async fn echo(conn: &quinn::Connection, payload: &[u8]) -> Result<Vec<u8>, String> {
    let round_trip = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(payload).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())
    };
    timeout(DEADLINE, round_trip).await.expect("echo timed out")
}

fn material() -> DevMaterial {
    generate_dev_material(&[1, 2], &[]).expect("dev material")
}

/// A client speaking the peer ALPN but presenting no certificate, which the
/// public API deliberately cannot build.
fn peer_alpn_without_cert(ca_pem: &str) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_PEER.to_vec()];
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

#[tokio::test]
async fn peer_with_node_certificate_is_classified_peer_and_echoes() {
    let m = material();
    let mut server = start_server(&m.node_tls(1).unwrap());
    let config = m.node_tls(2).unwrap().peer_client_config().unwrap();

    let (_ep, conn) = connect(config, server.addr).await;
    let conn = conn.expect("peer connects");
    assert_eq!(
        echo(&conn, b"append entries").await.unwrap(),
        b"append entries"
    );
    assert!(matches!(
        server.next_event().await,
        ServerEvent::Classified(Ok(ConnectionKind::Peer))
    ));
}

#[tokio::test]
async fn operator_is_classified_admin() {
    let m = material();
    let mut server = start_server(&m.node_tls(1).unwrap());
    let config = m.operator_tls().unwrap().admin_client_config().unwrap();

    let (_ep, conn) = connect(config, server.addr).await;
    let conn = conn.expect("operator connects");
    assert_eq!(echo(&conn, b"status").await.unwrap(), b"status");
    assert!(matches!(
        server.next_event().await,
        ServerEvent::Classified(Ok(ConnectionKind::Admin))
    ));
}

/// Both ends ask the other, through QUIC's ACK frequency extension, to acknowledge less
/// often than every second packet (fewer acknowledgement-only packets under load).
#[tokio::test]
async fn connections_ask_for_fewer_acknowledgements() {
    let m = material();
    let server = start_server(&m.node_tls(1).unwrap());
    let (_ep, conn) = connect(agent_client_config(&m.ca_cert_pem).unwrap(), server.addr).await;
    let conn = conn.expect("agent connects");
    for i in 0..20u8 {
        assert_eq!(echo(&conn, &[i]).await.unwrap(), [i]);
    }
    let stats = conn.stats();
    assert!(stats.frame_tx.ack_frequency >= 1, "{:?}", stats.frame_tx);
    assert!(stats.frame_rx.ack_frequency >= 1, "{:?}", stats.frame_rx);
}

#[tokio::test]
async fn agent_without_certificate_is_agent_but_peer_alpn_needs_one() {
    let m = material();
    let mut server = start_server(&m.node_tls(1).unwrap());

    let (_ep, conn) = connect(agent_client_config(&m.ca_cert_pem).unwrap(), server.addr).await;
    let conn = conn.expect("agent connects");
    assert_eq!(echo(&conn, b"claim").await.unwrap(), b"claim");
    assert!(matches!(
        server.next_event().await,
        ServerEvent::Classified(Ok(ConnectionKind::Agent))
    ));

    let (_ep2, conn) = connect(peer_alpn_without_cert(&m.ca_cert_pem), server.addr).await;
    // The handshake itself succeeds (certificates are optional at the TLS layer) ...
    let conn = conn.expect("handshake succeeds");
    match server.next_event().await {
        ServerEvent::Classified(Err(msg)) => {
            assert_eq!(msg, "peer connection presented no client certificate");
        }
        other => panic!("expected a classify error, got {other:?}"),
    }
    // ... but the server closes the connection and nothing gets through.
    let closed = timeout(DEADLINE, conn.closed())
        .await
        .expect("close timed out");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == 1u32.into()),
        "unexpected close: {closed:?}"
    );
    assert!(echo(&conn, b"vote").await.is_err());
}

#[tokio::test]
async fn peer_certificate_from_another_ca_is_refused() {
    let m = material();
    let other = generate_dev_material(&[2], &[]).unwrap();
    let mut server = start_server(&m.node_tls(1).unwrap());
    // Trusts the right CA (so it accepts the server) but presents a foreign cert.
    let (cert, key) = other.node(2).unwrap();
    let foreign = format!("{}{}", m.ca_cert_pem, other.ca_cert_pem);
    let config = NodeTls::from_pem(&foreign, cert, key)
        .unwrap()
        .peer_client_config()
        .unwrap();

    let (_ep, conn) = connect(config, server.addr).await;
    // In TLS 1.3 the client may finish its side before the server has checked
    // the client certificate, so the connection can look up for a moment; it
    // must still never carry a stream.
    if let Ok(conn) = conn {
        assert!(echo(&conn, b"append entries").await.is_err());
    }
    match server.next_event().await {
        // Both dev CAs share a subject name, so webpki reports a bad
        // signature rather than an unknown issuer; either way, rejected.
        ServerEvent::HandshakeFailed(msg) => {
            assert!(msg.contains("invalid peer certificate"), "{msg}");
        }
        other => panic!("expected a failed handshake, got {other:?}"),
    }
    server.assert_no_more_events();
}

#[tokio::test]
async fn agent_trusting_another_ca_cannot_connect() {
    let m = material();
    let other = generate_dev_material(&[1], &[]).unwrap();
    let mut server = start_server(&m.node_tls(1).unwrap());

    let (_ep, conn) = connect(
        agent_client_config(&other.ca_cert_pem).unwrap(),
        server.addr,
    )
    .await;
    let err = conn.expect_err("agent must reject a node signed by a foreign ca");
    assert!(err.contains("certificate"), "unexpected error: {err}");
    match server.next_event().await {
        ServerEvent::HandshakeFailed(msg) => assert!(msg.contains("aborted by peer"), "{msg}"),
        other => panic!("expected a failed handshake, got {other:?}"),
    }
    server.assert_no_more_events();
}

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    }
}

#[test]
fn dev_material_is_written_protected_and_loadable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let written = write_dev_material(&dir, &[1, 2], &[], false).unwrap();
    let names: Vec<_> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca.key",
            "node1.pem",
            "node1.key",
            "node2.pem",
            "node2.key",
            "operator.pem",
            "operator.key"
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for path in &written {
            let mode = path.metadata().unwrap().permissions().mode() & 0o777;
            if path.extension().unwrap() == "key" {
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
    }

    // Refuses to overwrite, and leaves the existing files alone.
    let ca_before = std::fs::read(dir.join("ca.pem")).unwrap();
    match write_dev_material(&dir, &[1, 2], &[], false) {
        Err(TlsError::WouldOverwrite { path }) => assert_eq!(path, dir.join("ca.pem")),
        other => panic!("expected WouldOverwrite, got {other:?}"),
    }
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_before);
    write_dev_material(&dir, &[1, 2], &[], true).expect("overwrite allowed");
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_before);

    NodeTls::load(&files(&dir, "node1")).expect("node1 loads");
    NodeTls::load(&files(&dir, "node2")).expect("node2 loads");
    NodeTls::load(&files(&dir, "operator")).expect("operator loads");
    agent_client_config_from_file(&dir.join("ca.pem")).expect("agent config from file");

    // Errors say which file and what is wrong.
    let mut missing = files(&dir, "node1");
    missing.key = dir.join("node9.key");
    let err = NodeTls::load(&missing).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{} does not exist", dir.join("node9.key").display())
    );

    let mut swapped = files(&dir, "node1");
    swapped.cert = dir.join("node1.key");
    let err = NodeTls::load(&swapped).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("no certificate in {}", dir.join("node1.key").display())
    );

    let mut swapped = files(&dir, "node1");
    swapped.key = dir.join("node1.pem");
    let err = NodeTls::load(&swapped).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("no private key in {}", dir.join("node1.pem").display())
    );

    let mut mismatched = files(&dir, "node1");
    mismatched.key = dir.join("node2.key");
    let err = NodeTls::load(&mismatched).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(!err.to_string().contains("PRIVATE KEY"));

    let err = agent_client_config_from_file(&dir.join("nope.pem")).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[test]
fn certificates_carry_the_expected_names_and_usages() {
    let m = generate_dev_material(&[1], &["10.1.2.3".into(), "reg.example.com".into()]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(m.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let check = |cert_pem: &str, name: &str| {
        let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    };
    let (node1, _) = m.node(1).unwrap();
    for name in [
        DEFAULT_SERVER_NAME,
        "node1",
        "localhost",
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "reg.example.com",
    ] {
        check(node1, name).unwrap_or_else(|e| panic!("node1 cert should be valid for {name}: {e}"));
    }
    assert!(check(node1, "node2").is_err());
    // The operator certificate is for clients only: it cannot pose as a node.
    assert!(check(&m.operator.0, DEFAULT_SERVER_NAME).is_err());

    // A certificate from another CA is caught when loading, not at handshake.
    let other = generate_dev_material(&[1], &[]).unwrap();
    let (cert, key) = other.node(1).unwrap();
    let err = NodeTls::from_pem(&m.ca_cert_pem, cert, key).unwrap_err();
    assert!(matches!(err, TlsError::Untrusted { .. }), "{err}");

    // Bad input is rejected up front.
    assert!(matches!(
        generate_dev_material(&[1, 1], &[]),
        Err(TlsError::DuplicateNodeId(1))
    ));
    assert!(matches!(
        generate_dev_material(&[1], &["not a name".into()]),
        Err(TlsError::InvalidSan { .. })
    ));

    // Debug output never shows private keys.
    assert!(!format!("{m:?}").contains("PRIVATE KEY"));
    assert!(!format!("{:?}", m.node_tls(1).unwrap()).contains("PRIVATE KEY"));
}

// ---- stateless resets across a restart ----

/// A node's QUIC endpoint on `socket`, in `rt`, accepting and holding connections.
fn node_endpoint(
    rt: &tokio::runtime::Runtime,
    config: quinn::EndpointConfig,
    tls: &NodeTls,
    socket: std::net::UdpSocket,
) -> Endpoint {
    let server = tls
        .server_config(agentreg::transport::tls::IDLE_TIMEOUT)
        .unwrap();
    rt.block_on(async move {
        let ep =
            Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime)).unwrap();
        let accept = ep.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = accept.accept().await {
                if let Ok(conn) = incoming.await {
                    held.push(conn);
                }
            }
        });
        ep
    })
}

/// The endpoint config of a node with the endpoint secret derived from its key.
fn stable(node: &NodeTls) -> quinn::EndpointConfig {
    agentreg::transport::tls::endpoint_config(&node.endpoint_secret())
}

/// How the connection a client opened to a node's previous run ends once the node is back
/// on the same port with `restarted`, and the client sends on the old connection.
fn old_connection_after_restart(
    restarted: impl FnOnce(&NodeTls) -> quinn::EndpointConfig,
) -> Result<quinn::ConnectionError, tokio::time::error::Elapsed> {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    write_dev_material(&tls_dir, &[1], &[], false).unwrap();
    let node = NodeTls::load(&TlsFiles {
        ca: tls_dir.join("ca.pem"),
        cert: tls_dir.join("node1.pem"),
        key: tls_dir.join("node1.key"),
    })
    .unwrap();
    let ca = std::fs::read_to_string(tls_dir.join("ca.pem")).unwrap();

    let first_run = tokio::runtime::Runtime::new().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let endpoint = node_endpoint(&first_run, stable(&node), &node, socket);

    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let conn = client_rt.block_on(async {
        let mut client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(agent_client_config(&ca).unwrap());
        let conn = client
            .connect(addr, DEFAULT_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        (client, conn)
    });

    // A crash: the node's tasks and socket vanish without a word to the client.
    first_run.shutdown_background();
    drop(endpoint);
    let second_run = tokio::runtime::Runtime::new().unwrap();
    let socket = client_rt.block_on(async {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match std::net::UdpSocket::bind(addr) {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("port {addr} not free again: {e}"),
            }
        }
    });
    let _endpoint = node_endpoint(&second_run, restarted(&node), &node, socket);

    let (_client, conn) = conn;
    client_rt.block_on(async {
        if let Ok((mut send, _recv)) = conn.open_bi().await {
            let _ = send.write_all(&[0u8; 200]).await;
        }
        // Well inside the 10 s idle timeout.
        timeout(Duration::from_secs(3), conn.closed()).await
    })
}

#[test]
fn a_restarted_node_resets_the_connections_of_its_previous_run() {
    let ended = old_connection_after_restart(stable)
        .expect("the old connection ends at once, not at the idle timeout");
    assert!(
        matches!(ended, quinn::ConnectionError::Reset),
        "ended by a stateless reset, got {ended:?}"
    );
    // The control: with a fresh random reset key (quinn's default) the restarted node cannot
    // reset the old connection, and the client keeps sending into it.
    assert!(
        old_connection_after_restart(|_| quinn::EndpointConfig::default()).is_err(),
        "without the node's stable reset key the old connection lingers"
    );
}

/// Until when a node's certificate verifies: what `/metrics` and `agentreg status` report.
#[test]
fn a_certificate_is_valid_until_its_expiry() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let until = material().node_tls(1).unwrap().valid_until().unwrap();
    // Dev certificates last ten years (365-day years).
    let ten_years = 10 * 365 * 86_400;
    assert!(
        until.abs_diff(now + ten_years) < 120,
        "valid until {until}, expected about {}",
        now + ten_years
    );
}
