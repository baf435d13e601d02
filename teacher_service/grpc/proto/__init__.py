"""The teacher's gRPC schema (`teacher.proto`) and its generated Python stubs.

The stubs are committed so clients need only grpcio + protobuf (no protoc at run time); regenerate
them with `python -m teacher_service.grpc.proto.generate` after editing the .proto. A test checks that
the committed stubs still describe the committed .proto.
"""
