"""kcls.serving.client: request builders against TF Serving's documented shapes, response
parsers, and the REST/gRPC transports against small fake servers on 127.0.0.1.

The fakes answer like TF Serving (JSON/proto layout, `{"error": ...}` bodies, gRPC
status codes); their labels are a digest of the image bytes they received, so the
tests see that images survive the base64/proto round trip byte for byte.
"""

import base64
import hashlib
import json
import re
import socket
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import closed_port

from kcls.cli import main
from kcls.monitoring.prediction_log import read_predictions
from kcls.serving import client as serving_client
from kcls.serving.client import Prediction, ServingError

IMAGES = [b"\x89PNG\r\n\x1a\n first image \x00\xff", b"\xff\xd8\xff second \x00 image"]
CORRUPT = b"BAD: not an image"
DECODE_ERROR = ("Unknown image file format. One of JPEG, PNG, GIF, BMP required.\n"
                "\t [[{{node DecodeImage}}]]")

def digest(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()[:12]


def fake_outputs(images: list[bytes]) -> dict[str, np.ndarray]:
    """What the fake servers answer: serving_default's outputs, labelled by image digest."""
    if any(image.startswith(b"BAD") for image in images):
        raise ValueError(DECODE_ERROR)
    count = len(images)
    return {"labels": np.array([[digest(image), "other"] for image in images], dtype=object),
            "scores": np.tile(np.float32([0.75, 0.25]), (count, 1)),
            "classes": np.tile(np.int32([2, 0]), (count, 1)),
            "probabilities": np.tile(np.float32([0.25, 0.0, 0.75]), (count, 1))}


# ---------------------------------------------------------------------------------------
# REST: builders and parsers
# ---------------------------------------------------------------------------------------


def test_rest_url_follows_the_documented_paths():
    assert (serving_client.rest_url("http://host:8501", "quickstart")
            == "http://host:8501/v1/models/quickstart:predict")
    assert (serving_client.rest_url("http://host:8501/", "quickstart", version=3)
            == "http://host:8501/v1/models/quickstart/versions/3:predict")
    assert (serving_client.rest_url("localhost:8501", "digits", verb="classify")
            == "http://localhost:8501/v1/models/digits:classify")
    for bad in ("ftp://host:8501", "http://"):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            serving_client.rest_url(bad, "quickstart")


def test_rest_predict_request_row_and_columnar_shapes():
    encoded = [{"b64": base64.b64encode(image).decode()} for image in IMAGES]
    assert serving_client.rest_predict_request(IMAGES) == {
        "signature_name": "serving_default", "instances": encoded}
    assert serving_client.rest_predict_request(IMAGES, "predict_bytes", columnar=True) == {
        "signature_name": "predict_bytes", "inputs": {"image_bytes": encoded}}
    # Plain JSON: each instance is exactly one {"b64": <standard base64 str>} object.
    body = json.loads(json.dumps(serving_client.rest_predict_request(IMAGES)))
    assert [base64.b64decode(item["b64"], validate=True) for item in body["instances"]] == IMAGES


def test_rest_classify_request_is_a_list_of_examples_with_an_image_bytes_feature():
    assert serving_client.rest_classify_request(IMAGES[:1]) == {
        "signature_name": "classify",
        "examples": [{"image_bytes": {"b64": base64.b64encode(IMAGES[0]).decode()}}]}


def test_requests_need_a_list_of_images():
    with pytest.raises(TypeError, match="sequence of encoded images"):
        serving_client.rest_predict_request(IMAGES[0])
    with pytest.raises(ValueError, match="at least one image"):
        serving_client.rest_predict_request([])


def test_row_and_columnar_predict_answers_parse_to_the_same_predictions():
    outputs = fake_outputs(IMAGES)
    columns = {name: values.tolist() for name, values in outputs.items()}
    row = {"predictions": [{name: values[index] for name, values in columns.items()}
                           for index in range(len(IMAGES))]}
    parsed = serving_client.parse_rest_predict_response(row)
    assert parsed == serving_client.parse_rest_predict_response({"outputs": columns})
    assert parsed[1] == Prediction(labels=[digest(IMAGES[1]), "other"], scores=[0.75, 0.25],
                                   classes=[2, 0], probabilities=[0.25, 0.0, 0.75])
    assert parsed[0].top(1) == [(digest(IMAGES[0]), 0.75)]


def test_predict_answer_errors_become_serving_errors():
    with pytest.raises(ServingError, match=r"^Unknown image file format.*DecodeImage"):
        serving_client.parse_rest_predict_response({"error": DECODE_ERROR})
    with pytest.raises(ServingError, match="neither 'predictions' nor 'outputs'"):
        serving_client.parse_rest_predict_response({"result": []})
    with pytest.raises(ServingError, match="kcls outputs"):  # e.g. a non-kcls model
        serving_client.parse_rest_predict_response({"predictions": [[0.1, 0.9]]})


def test_classify_answer_parses_with_either_documented_key():
    results = [[["owl", 0.7], ["cat", 0.2]]]
    for key in ("results", "result"):
        assert serving_client.parse_rest_classify_response({key: results}) == [
            [("owl", 0.7), ("cat", 0.2)]]


# ---------------------------------------------------------------------------------------
# gRPC: builders and parsers
# ---------------------------------------------------------------------------------------


def test_image_bytes_tensor_proto_is_a_string_vector():
    proto = serving_client.image_bytes_tensor_proto(IMAGES)
    assert proto == tf.make_tensor_proto(IMAGES, dtype=tf.string)
    assert proto.dtype == tf.string.as_datatype_enum
    assert [dim.size for dim in proto.tensor_shape.dim] == [len(IMAGES)]
    assert tf.make_ndarray(proto).tolist() == IMAGES


def test_grpc_predict_request_fills_model_spec_and_image_bytes():
    pytest.importorskip("tensorflow_serving.apis")
    request = serving_client.grpc_predict_request(IMAGES, "quickstart", version=4)
    assert type(request).DESCRIPTOR.full_name == "tensorflow.serving.PredictRequest"
    assert request.model_spec.name == "quickstart"
    assert request.model_spec.signature_name == "serving_default"
    assert request.model_spec.version.value == 4
    assert list(request.inputs) == ["image_bytes"]
    assert request.inputs["image_bytes"] == tf.make_tensor_proto(IMAGES, dtype=tf.string)
    latest = serving_client.grpc_predict_request(IMAGES[:1], "quickstart")
    assert not latest.model_spec.HasField("version")


def test_grpc_without_tensorflow_serving_api_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(serving_client.MissingServingApiError,
                       match="pip install tensorflow-serving-api"):
        serving_client.grpc_predict_request(IMAGES, "quickstart")
    result = CliRunner().invoke(main, ["predict", "--grpc", "127.0.0.1:8500", "--model", "m",
                                       __file__])
    assert result.exit_code == 2 and "pip install tensorflow-serving-api" in result.output


def test_grpc_answer_parses_like_the_rest_answer():
    apis = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    response = apis.PredictResponse()
    for name, values in fake_outputs(IMAGES).items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(values))
    columns = {name: values.tolist() for name, values in fake_outputs(IMAGES).items()}
    assert (serving_client.parse_grpc_predict_response(response)
            == serving_client.parse_rest_predict_response({"outputs": columns}))


# ---------------------------------------------------------------------------------------
# REST transport against a fake TF Serving on 127.0.0.1
# ---------------------------------------------------------------------------------------


class FakeRestServing(BaseHTTPRequestHandler):
    """`POST /v1/models/tiny[/versions/N]:predict`, answering like TF Serving."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body,
                                    "content_type": self.headers["Content-Type"]})
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
        if not match or match.group(1) != "tiny":
            name = match.group(1) if match else self.path
            return self.answer(404, {"error": f"Servable not found for request: Latest({name})"})
        images = [base64.b64decode(item["b64"], validate=True) for item in body["instances"]]
        try:
            outputs = fake_outputs(images)
        except ValueError as error:
            return self.answer(400, {"error": str(error)})
        self.answer(200, {"predictions": [
            {name: values[index].tolist() for name, values in outputs.items()}
            for index in range(len(images))]})

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def rest_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRestServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def rest(rest_server, loopback_only):
    FakeRestServing.requests.clear()
    return rest_server


def test_loopback_fixture_still_blocks_other_hosts(loopback_only):
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("192.0.2.1", 8501), timeout=0.1)


def test_rest_predict_round_trips_images_and_parses_the_answer(rest):
    predictions = serving_client.rest_predict(rest, "tiny", IMAGES, version=2, timeout=10)
    assert [prediction.labels[0] for prediction in predictions] == [digest(i) for i in IMAGES]
    (sent,) = FakeRestServing.requests
    assert sent["path"] == "/v1/models/tiny/versions/2:predict"
    assert sent["content_type"] == "application/json"
    assert sent["body"] == serving_client.rest_predict_request(IMAGES)


def test_rest_errors_are_one_line_serving_errors(rest):
    with pytest.raises(ServingError) as error:
        serving_client.rest_predict(rest, "tiny", [IMAGES[0], CORRUPT], timeout=10)
    message = str(error.value)
    assert "\n" not in message and "HTTP 400" in message
    assert "Unknown image file format. One of JPEG, PNG, GIF, BMP required." in message
    with pytest.raises(ServingError, match=r"HTTP 404: Servable not found .*Latest\(nope\)"):
        serving_client.rest_predict(rest, "nope", IMAGES, timeout=10)
    with pytest.raises(ServingError, match="cannot reach TF Serving .*Is the server running"):
        serving_client.rest_predict(f"http://127.0.0.1:{closed_port()}", "tiny", IMAGES,
                                    timeout=10)


def test_cli_predict_server_prints_one_line_per_image(rest, tmp_path):
    paths = []
    for index, image in enumerate(IMAGES):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(image)
    result = CliRunner().invoke(main, ["predict", "--server", rest, "--model", "tiny",
                                       "--top-k", "1", *map(str, paths)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{path}: {digest(image)} (0.750)"
                                          for path, image in zip(paths, IMAGES)]


def test_cli_predict_server_errors_are_one_line(rest, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(CORRUPT)
    result = CliRunner().invoke(main, ["predict", "--server", rest, "--model", "tiny", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad}: TF Serving at ")
    assert "Unknown image file format" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["predict", "--server", f"127.0.0.1:{closed_port()}",
                                       "--model", "tiny", str(bad)])
    assert result.exit_code == 1 and "cannot reach TF Serving" in result.output


def test_cli_predict_server_log_appends_answers_kcls_monitor_reads(rest, tmp_path):
    paths = []
    for index, image in enumerate(IMAGES):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(image)
    log = tmp_path / "logs" / "served.jsonl"
    for _ in range(2):  # appends, never overwrites
        result = CliRunner().invoke(main, ["predict", "--server", rest, "--model", "tiny",
                                           "--log", str(log), *map(str, paths)])
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [record["image"] for record in records] == [str(path) for path in paths] * 2
    assert records[0]["labels"] == [digest(IMAGES[0]), "other"]
    assert records[0]["model"] == "tiny" and records[0]["time"].endswith("Z")
    classes, confidences = read_predictions(log, ["a", "b", "c"])
    assert classes.tolist() == [2, 2, 2, 2] and confidences.tolist() == [0.75] * 4
    local = CliRunner().invoke(main, ["predict", str(tmp_path), str(paths[0]), "--log",
                                      str(log)])
    assert local.exit_code == 2 and "--log records served answers" in local.output


def test_cli_predict_remote_needs_a_model_name(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(IMAGES[0])
    result = CliRunner().invoke(main, ["predict", "--server", "http://h:8501", str(image)])
    assert result.exit_code == 2 and "--model NAME is required" in result.output
    result = CliRunner().invoke(main, ["predict", "--server", "http://h:8501", "--grpc", "h:8500",
                                       "--model", "m", str(image)])
    assert result.exit_code == 2 and "not both" in result.output


# ---------------------------------------------------------------------------------------
# gRPC transport against a fake PredictionService on 127.0.0.1
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_server():
    grpc = pytest.importorskip("grpc")
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_service_pb2_grpc")
    from tensorflow_serving.apis import predict_pb2

    received = []

    class FakePredictionService(apis.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC method name)
            received.append(request)
            if request.model_spec.name != "tiny":
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"Servable not found for request: Latest({request.model_spec.name})")
            images = tf.make_ndarray(request.inputs["image_bytes"]).tolist()
            try:
                outputs = fake_outputs(images)
            except ValueError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            response = predict_pb2.PredictResponse()
            for name, values in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(values))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    apis.add_PredictionServiceServicer_to_server(FakePredictionService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", received
    server.stop(0)


def test_grpc_predict_round_trips_images_and_parses_the_answer(grpc_server, loopback_only):
    target, received = grpc_server
    predictions = serving_client.grpc_predict(target, "tiny", IMAGES, version=7, timeout=10)
    assert [prediction.labels[0] for prediction in predictions] == [digest(i) for i in IMAGES]
    assert predictions[0].scores == [0.75, 0.25] and predictions[0].classes == [2, 0]
    assert received[-1] == serving_client.grpc_predict_request(IMAGES, "tiny", version=7)


def test_grpc_errors_are_one_line_serving_errors(grpc_server, loopback_only):
    target, _ = grpc_server
    with pytest.raises(ServingError, match="INVALID_ARGUMENT: Unknown image file format") as error:
        serving_client.grpc_predict(target, "tiny", [CORRUPT], timeout=10)
    assert "\n" not in str(error.value)
    with pytest.raises(ServingError, match=r"NOT_FOUND: Servable not found .*Latest\(nope\)"):
        serving_client.grpc_predict(target, "nope", IMAGES, timeout=10)
    with pytest.raises(ServingError, match="UNAVAILABLE"):
        serving_client.grpc_predict(f"127.0.0.1:{closed_port()}", "tiny", IMAGES, timeout=5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        serving_client.grpc_predict(f"http://{target}", "tiny", IMAGES)


def test_cli_predict_grpc_prints_one_line_per_image(grpc_server, loopback_only, tmp_path):
    target, _ = grpc_server
    path = tmp_path / "a.png"
    path.write_bytes(IMAGES[0])
    result = CliRunner().invoke(main, ["predict", "--grpc", target, "--model", "tiny",
                                       "--top-k", "2", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output == f"{path}: {digest(IMAGES[0])} (0.750)  other (0.250)\n"
