//! TLS (rustls, ring provider) for the API: the server's certificate from PEM files, and the
//! process-wide crypto provider both the server and the [`crate::client::Client`] use.

/// Installs rustls' ring provider as the process default (once; later calls do nothing).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The server side: a PEM certificate chain and its PEM private key (PKCS#8, PKCS#1 or SEC1).
pub async fn server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<axum_server::tls_rustls::RustlsConfig, String> {
    install_provider();
    for p in [cert, key] {
        std::fs::metadata(p).map_err(|e| format!("tls: {}: {e}", p.display()))?;
    }
    axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .map_err(|e| {
            format!(
                "tls: certificate {} / key {}: {e}",
                cert.display(),
                key.display()
            )
        })
}
