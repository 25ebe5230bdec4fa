//! How a client's op and its answer are kept where they outlive the request (a proposal in
//! meta, a co-sign call to a peer): etcd's own protobuf `RequestOp` / `ResponseOp`, in hex.

use etcd_client::proto as pb;
use prost::Message;

/// A client's op, stored.
pub(crate) fn encode_op(op: &pb::PbTxnOpRequest) -> String {
    hex::encode(pb::PbTxnRequestOp { request: Some(op.clone()) }.encode_to_vec())
}

/// A stored op; `None` when the text is not one.
pub(crate) fn decode_op(text: &str) -> Option<pb::PbTxnOpRequest> {
    let bytes = hex::decode(text).ok()?;
    pb::PbTxnRequestOp::decode(bytes.as_slice()).ok()?.request
}

/// An answer, stored.
pub(crate) fn encode_answer(answer: pb::PbTxnOpResponse) -> String {
    hex::encode(pb::PbResponseOp { response: Some(answer) }.encode_to_vec())
}

/// A stored answer; `None` when the text is not one.
pub(crate) fn decode_answer(text: &str) -> Option<pb::PbTxnOpResponse> {
    let bytes = hex::decode(text).ok()?;
    pb::PbResponseOp::decode(bytes.as_slice()).ok()?.response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_and_answers_come_back_as_stored() {
        let op = pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest { key: b"/k".to_vec(), value: b"v".to_vec(), ..Default::default() });
        assert_eq!(decode_op(&encode_op(&op)), Some(op));
        let answer = pb::PbTxnOpResponse::ResponsePut(pb::PbPutResponse::default());
        assert_eq!(decode_answer(&encode_answer(answer.clone())), Some(answer));
        assert_eq!(decode_op("not hex"), None);
        assert_eq!(decode_answer("00ff"), None);
    }
}
