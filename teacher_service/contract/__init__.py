"""What students and the teacher agree on: the request/response protocol, model input
preprocessing and replayable augmented views (`augment`: (key, view, seed, recipe) → pixels).

`answer_codec` encodes the embeddings of an answer in fp16, bf16 or int8 and decodes them.

Light by design (numpy, PIL, torch for preprocessing only): students import it without Serve.
"""
from teacher_service.contract.answer_codec import ANSWER_DTYPES, EncodedRows, decode_rows, encode_rows
from teacher_service.contract.augment import augment_view, image_digests, image_refs, token_digests, view_recipe
from teacher_service.contract.preprocess import PreprocessSpec, fit_context, preprocess_spec, to_model_input
from teacher_service.contract.protocol import (
    EmbedRequest,
    EmbedResponse,
    ImageRefs,
    RequestError,
    RequestLimits,
    validate_request,
)

__all__ = ["ANSWER_DTYPES", "EmbedRequest", "EmbedResponse", "EncodedRows", "ImageRefs", "PreprocessSpec",
           "RequestError", "RequestLimits", "augment_view", "decode_rows", "encode_rows", "fit_context",
           "image_digests", "image_refs", "preprocess_spec", "to_model_input", "token_digests", "validate_request",
           "view_recipe"]
