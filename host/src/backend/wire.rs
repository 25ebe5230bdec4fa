//! How requests travel to etcd: the metadata key of an auth token, and a codec that encodes a
//! shared message, so a request sent again (after its token was refused) is not copied first.

use std::marker::PhantomData;
use std::sync::Arc;

use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// The request metadata key etcd reads an auth token from.
pub(super) const TOKEN: &str = "token";

/// Encodes an `Arc<Q>` as `Q`'s protobuf, decodes answers as `R`.
pub(super) struct SharedCodec<Q, R>(PhantomData<fn(Q) -> R>);

impl<Q, R> Default for SharedCodec<Q, R> {
    fn default() -> Self {
        SharedCodec(PhantomData)
    }
}

/// The encoder half of [`SharedCodec`].
pub(super) struct SharedEncoder<Q>(PhantomData<fn(Q)>);

impl<Q: prost::Message> Encoder for SharedEncoder<Q> {
    type Item = Arc<Q>;
    type Error = Status;

    fn encode(&mut self, item: Arc<Q>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf).map_err(|e| Status::internal(format!("cannot encode a request to etcd: {e}")))
    }
}

impl<Q, R> Codec for SharedCodec<Q, R>
where
    Q: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + 'static,
{
    type Encode = Arc<Q>;
    type Decode = R;
    type Encoder = SharedEncoder<Q>;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}
