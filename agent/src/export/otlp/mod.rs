//! OTLP export: span records encoded straight to protobuf ([`encode`]) and sent over gRPC or
//! HTTP ([`transport`]) with the exporter specification's timeout, gzip and retry rules.
//! [`sdk`] converts the same records for opentelemetry-otlp's exporter: the reference the
//! encoder is tested against, and selectable (`--otlp-encoder=sdk`) to compare them.
pub mod encode;
pub mod sdk;
pub mod transport;
pub mod wire;

use std::{borrow::Cow, io::Write as _, time::Duration};

use bytes::Bytes;

use crate::{config::OtlpConfig, export::retry, trace::span::SpanRecord};
use transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("could not build the OTLP exporter: {0}")]
    Build(String),
    #[error("reading the OTLP CA certificate {path}: {source}")]
    Certificate {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("OTLP export failed: {0}")]
    Export(String),
}

/// What became of a batch the collector answered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Spans the collector received (including any it then rejected).
    pub sent: usize,
    /// Spans it rejected (`partial_success.rejected_spans`).
    pub rejected: u64,
}

pub enum OtlpSink {
    Direct(Direct),
    Sdk(sdk::SdkSink),
}

impl OtlpSink {
    pub fn new(cfg: &OtlpConfig, host: String, command_line: bool) -> Result<Self, OtlpError> {
        // One crypto provider for every TLS client in the process (rustls needs it chosen).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(if cfg.sdk_encoder {
            OtlpSink::Sdk(sdk::SdkSink::new(cfg, host, command_line)?)
        } else {
            OtlpSink::Direct(Direct {
                encoder: encode::Encoder::new(host, command_line),
                transport: Transport::new(cfg)?,
                timeout: cfg.timeout,
                body: Vec::new(),
            })
        })
    }

    /// Whether [`OtlpSink::export`] needs the batch by value (the reference encoder does).
    pub fn consumes(&self) -> bool {
        matches!(self, OtlpSink::Sdk(_))
    }

    /// Exports a batch: `spans`, or `owned` when [`OtlpSink::consumes`].
    pub async fn export(
        &mut self,
        owned: Vec<SpanRecord>,
        spans: &[SpanRecord],
    ) -> Result<Delivered, OtlpError> {
        match self {
            OtlpSink::Direct(d) => d.export(spans).await,
            OtlpSink::Sdk(s) => s
                .export(owned)
                .await
                .map(|sent| Delivered { sent, rejected: 0 }),
        }
    }

    /// An encoder making the requests this sink would (kspan's encoder only).
    pub fn encoder(&self) -> Option<encode::Encoder> {
        match self {
            OtlpSink::Direct(d) => Some(d.encoder.sibling()),
            OtlpSink::Sdk(_) => None,
        }
    }

    /// Sends `body`, an `ExportTraceServiceRequest` of `spans` spans made by
    /// [`OtlpSink::encoder`]'s encoder.
    pub async fn export_encoded(
        &mut self,
        body: Vec<u8>,
        spans: usize,
    ) -> Result<Delivered, OtlpError> {
        match self {
            OtlpSink::Direct(d) => d.send(Cow::Owned(body), spans).await,
            OtlpSink::Sdk(_) => Err(OtlpError::Export(
                "the reference exporter takes span records, not encoded requests".into(),
            )),
        }
    }

    pub fn shutdown(&mut self) {
        if let OtlpSink::Sdk(s) = self {
            s.shutdown();
        }
    }
}

pub struct Direct {
    encoder: encode::Encoder,
    transport: Transport,
    timeout: Duration,
    /// The last request's encoding, reused.
    body: Vec<u8>,
}

impl Direct {
    async fn export(&mut self, spans: &[SpanRecord]) -> Result<Delivered, OtlpError> {
        if spans.is_empty() {
            return Ok(Delivered::default());
        }
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        self.encoder.encode(spans, &mut body);
        let delivered = self.send(Cow::Borrowed(&body), spans.len()).await;
        self.body = body;
        delivered
    }

    /// Sends an encoded request of `n` spans, with the retry rules.
    /// `body` is the exporter's reused buffer, or a queued batch it may keep.
    async fn send(&self, body: Cow<'_, [u8]>, n: usize) -> Result<Delivered, OtlpError> {
        let body = match body {
            b if self.transport.wants_gzip_body() => gzip(&b)?,
            Cow::Borrowed(b) => Bytes::copy_from_slice(b),
            // The queue's batches are handed over as they are: a copy per batch was 1% of
            // the agent's CPU at keep-alive saturation.
            Cow::Owned(b) => Bytes::from(b),
        };
        let (transport, timeout) = (&self.transport, self.timeout);
        let response = retry::run(|| transport.send(body.clone(), timeout))
            .await
            .map_err(OtlpError::Export)?;
        let rejected = match wire::partial_success(&response) {
            Ok(p) if p.rejected_spans > 0 || !p.error_message.is_empty() => {
                log::warn!(
                    "the collector rejected {} of {n} spans: {}",
                    p.rejected_spans,
                    p.error_message
                );
                p.rejected_spans.clamp(0, n as i64) as u64
            }
            Ok(_) => 0,
            Err(e) => {
                log::warn!("{e}");
                0
            }
        };
        Ok(Delivered { sent: n, rejected })
    }
}

/// The extra CA certificate (PEM) the configuration names, read once per exporter.
fn certificate(cfg: &OtlpConfig) -> Result<Option<Vec<u8>>, OtlpError> {
    cfg.certificate
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| OtlpError::Certificate {
                path: path.clone(),
                source,
            })
        })
        .transpose()
}

/// Fast gzip: the batches are repetitive, and the default level costs several times the CPU
/// of encoding them for a few percent of size.
fn gzip(body: &[u8]) -> Result<Bytes, OtlpError> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body)
        .and_then(|()| enc.finish())
        .map(Bytes::from)
        .map_err(|e| OtlpError::Export(format!("gzip: {e}")))
}

#[cfg(test)]
pub(crate) mod tests;
