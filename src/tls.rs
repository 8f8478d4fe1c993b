//! TLS for `wss://` and `https://` (rustls, ring): the server's certificate, read from PEM
//! files, and a connection's records in and out. rustls does no I/O of its own: the
//! connection reads and writes its socket as for plain connections and passes the bytes
//! through here, so the handshake and the records run on the shard like everything else.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConnection;

/// What new TLS connections are served with (shared by all; replaced by a reload).
pub type Acceptor = Arc<rustls::ServerConfig>;

/// The acceptor `[tls]` describes: its certificate chain and key, HTTP/1.1 over ALPN.
pub fn acceptor(tls: &crate::config::Tls) -> Result<Acceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("tls.cert {}: {e}", tls.cert))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate in it", tls.cert));
    }
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| format!("tls.key {}: {e}", tls.key))?;
    // ring, not aws-lc-rs: it builds with the C compiler alone (aws-lc wants cmake, which
    // these machines do not have). rustls deprecates it for lacking post-quantum key
    // exchange; X25519 and the P curves remain what browsers fall back to.
    //
    // Its default key exchange prefers P-384, whose arithmetic ring does without assembly:
    // 1.8 ms of the shard per handshake here, against X25519's (docs/BENCHMARKS.md, TLS).
    // X25519 first, then P-256, and P-384 for clients that offer nothing else.
    let provider = Arc::new(provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert and tls.key: {e}"))?;
    // WebSocket upgrades are HTTP/1.1: say so to clients that offer h2 first.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// ring's provider with X25519 preferred for key exchange.
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{default_provider, kx_group};
    rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..default_provider()
    }
}

/// A new connection's TLS state (boxed: several hundred bytes, only for TLS connections).
pub fn accept(acceptor: &Acceptor) -> Result<Box<ServerConnection>, rustls::Error> {
    ServerConnection::new(acceptor.clone()).map(Box::new)
}

/// Feed `cipher`, bytes read from the socket, to `tls`, and hand the plaintext they carried
/// to `plain` in chunks (read into `scratch`). Returns whether the client ended its side
/// (`close_notify`). An error is a broken or refused handshake or record: the alert rustls
/// queued for it goes out with the next [`send_records`].
pub fn receive(
    tls: &mut ServerConnection,
    mut cipher: &[u8],
    scratch: &mut [u8],
    mut plain: impl FnMut(&mut [u8]),
) -> io::Result<bool> {
    let mut ended = false;
    while !cipher.is_empty() {
        tls.read_tls(&mut cipher)?;
        let state = tls
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        loop {
            match tls.reader().read(scratch) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => plain(&mut scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if state.peer_has_closed() {
            ended = true;
        }
    }
    Ok(ended)
}

/// Write the records `tls` holds (handshake, alerts, encrypted data) to `fd`: true when
/// none is left, false when the socket took what it could.
pub fn send_records(tls: &mut ServerConnection, fd: RawFd) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(&mut Socket(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A connection's socket as rustls writes to it: never blocking, never raising SIGPIPE.
struct Socket(RawFd);

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: `buf` is a live buffer of `buf.len()` bytes; the fd is the connection's.
        let sent = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), flags) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
