//! Sending one encoded `ExportTraceServiceRequest`: OTLP/gRPC through tonic with a pass-through
//! codec (the bytes are already protobuf), or OTLP/HTTP through reqwest. Each attempt's outcome
//! is classified for the retry policy as the OTLP exporter specification says.
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::{OtlpError, wire};
use crate::{
    config::{Compression, OtlpConfig, Protocol},
    export::retry::{self, Attempt},
};

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

pub enum Transport {
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
        gzip: bool,
    },
}

impl Transport {
    pub fn new(cfg: &OtlpConfig) -> Result<Self, OtlpError> {
        let ca = super::certificate(cfg)?;
        let bad_header =
            |k: &str, e: &dyn std::fmt::Display| OtlpError::Build(format!("header {k:?}: {e}"));
        match cfg.protocol {
            Protocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                            .map_err(|e| bad_header(k, &e))?;
                    metadata.insert(key, v.parse().map_err(|e| bad_header(k, &e))?);
                }
                let mut endpoint = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| OtlpError::Build(format!("{}: {e}", cfg.endpoint)))?
                    .connect_timeout(cfg.timeout);
                if cfg.endpoint.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| OtlpError::Build(e.to_string()))?;
                }
                let mut client = tonic::client::Grpc::new(endpoint.connect_lazy());
                if cfg.compression == Compression::Gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Ok(Transport::Grpc { client, metadata })
            }
            Protocol::HttpProtobuf => {
                let mut client = reqwest::Client::builder().connect_timeout(cfg.timeout);
                if let Some(pem) = &ca {
                    let certs = reqwest::Certificate::from_pem_bundle(pem)
                        .map_err(|e| OtlpError::Build(format!("CA certificate: {e}")))?;
                    client = client.tls_certs_merge(certs);
                }
                let client = client
                    .build()
                    .map_err(|e| OtlpError::Build(e.to_string()))?;
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &cfg.headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|e| bad_header(k, &e))?;
                    headers.insert(name, v.parse().map_err(|e| bad_header(k, &e))?);
                }
                Ok(Transport::Http {
                    client,
                    url: cfg.endpoint.clone(),
                    headers,
                    gzip: cfg.compression == Compression::Gzip,
                })
            }
        }
    }

    /// Whether the body handed to [`Transport::send`] should be gzipped by the caller (gRPC
    /// compresses inside its own framing).
    pub fn wants_gzip_body(&self) -> bool {
        matches!(self, Transport::Http { gzip: true, .. })
    }

    /// One attempt, bounded by `timeout`.
    pub async fn send(&self, body: Bytes, timeout: Duration) -> Attempt {
        match self {
            Transport::Grpc { client, metadata } => {
                // A clone shares the channel; calls need it mutably to wait until it is ready.
                let mut client = client.clone();
                let mut req = tonic::Request::new(body);
                *req.metadata_mut() = metadata.clone();
                req.set_timeout(timeout);
                let call = async {
                    client
                        .ready()
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    client
                        .unary(
                            req,
                            tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_PATH),
                            Raw,
                        )
                        .await
                };
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => Attempt::Retryable {
                        reason: format!("no answer within {timeout:?}"),
                        after: None,
                    },
                    Ok(Ok(resp)) => Attempt::Accepted(resp.into_inner()),
                    Ok(Err(status)) => grpc_attempt(&status),
                }
            }
            Transport::Http {
                client,
                url,
                headers,
                gzip,
            } => {
                let mut req = client
                    .post(url.as_str())
                    .headers(headers.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .timeout(timeout)
                    .body(body);
                if *gzip {
                    req = req.header(reqwest::header::CONTENT_ENCODING, "gzip");
                }
                retry::http_answer(req.send().await).await
            }
        }
    }
}

/// OTLP/gRPC: the codes the specification lists as retryable; RESOURCE_EXHAUSTED only when the
/// server says when to come back (RetryInfo), since otherwise it may never have room.
fn grpc_attempt(status: &tonic::Status) -> Attempt {
    use tonic::Code::*;
    let reason = format!("gRPC {:?}: {}", status.code(), status.message());
    let delay = wire::retry_delay(status.details());
    match status.code() {
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss => {
            Attempt::Retryable {
                reason,
                after: delay,
            }
        }
        ResourceExhausted if delay.is_some() => Attempt::Retryable {
            reason,
            after: delay,
        },
        _ => Attempt::Refused(reason),
    }
}

/// The request is already protobuf; the response is handed back undecoded.
#[derive(Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_exhausted_is_retried_only_with_retry_info() {
        let plain = tonic::Status::resource_exhausted("full");
        assert!(matches!(grpc_attempt(&plain), Attempt::Refused(_)));
        // google.rpc.Status { details: [Any { RetryInfo { retry_delay: 3 s } }] }
        let details: &[u8] =
            b"\x1a\x30\x0a\x28type.googleapis.com/google.rpc.RetryInfo\x12\x04\x0a\x02\x08\x03";
        let told = tonic::Status::with_details(
            tonic::Code::ResourceExhausted,
            "full",
            Bytes::from_static(details),
        );
        assert!(matches!(
            grpc_attempt(&told),
            Attempt::Retryable { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        for code in [tonic::Code::Unavailable, tonic::Code::DeadlineExceeded] {
            assert!(matches!(
                grpc_attempt(&tonic::Status::new(code, "x")),
                Attempt::Retryable { .. }
            ));
        }
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
            tonic::Code::Unimplemented,
        ] {
            assert!(matches!(
                grpc_attempt(&tonic::Status::new(code, "x")),
                Attempt::Refused(_)
            ));
        }
    }
}
