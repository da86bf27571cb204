import string

from packrat.torchserve import TEMPLATES as CONFIG


def placeholders(path) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(path.read_text()) if field}


def test_templates_render_with_str_format():
    # Whoever renders them uses str.format with exactly these keys.
    keys = {
        "inference_port", "management_port", "metrics_port", "grpc_inference_port",
        "grpc_management_port", "model_store", "allowed_urls", "log4j_config",
    }
    assert placeholders(CONFIG / "config.properties.template") == keys
    text = (CONFIG / "config.properties.template").read_text().format(**{k: "X" for k in keys})
    props = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key] == "http://127.0.0.1:X"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "true"
    assert "disable_token_authorization" not in props
    assert props["vmargs"] == "-Dlog4j.configurationFile=file://X"

    assert placeholders(CONFIG / "log4j2.xml") == {"log_dir"}
    (CONFIG / "log4j2.xml").read_text().format(log_dir="/tmp/logs")
