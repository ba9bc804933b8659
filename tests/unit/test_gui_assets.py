"""The GUI's static files as served: content types, validators and refusals, without I/O
beyond reading a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshling.controlplane.gui import STATIC_DIR
from meshling.controlplane.gui.assets import AssetError, answer, load_assets


def test_gui_assets_load_every_file_with_its_content_type() -> None:
    assets = load_assets(STATIC_DIR)
    assert {"index.html", "app.js", "api.js", "format.js", "topology.js", "style.css"} <= set(
        assets
    )
    assert assets["app.js"].content_type == "text/javascript; charset=utf-8"
    assert assets["index.html"].body.startswith(b"<!doctype html>")


def test_gui_assets_answer_the_index_for_the_bare_prefix_with_a_policy() -> None:
    assets = load_assets(STATIC_DIR)
    result = answer(assets, "", None)
    assert result.status == 200
    assert result.body == assets["index.html"].body
    assert "frame-ancestors 'none'" in result.headers["Content-Security-Policy"]
    # only the page carries the policy; scripts are not documents
    assert "Content-Security-Policy" not in answer(assets, "app.js", None).headers


def test_gui_assets_revalidate_with_the_etag(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><p>one</p>", encoding="utf-8")
    etag = load_assets(tmp_path)["index.html"].etag
    assert etag.startswith('"') and etag.endswith('"')
    assets = load_assets(tmp_path)
    assert answer(assets, "index.html", etag).status == 304
    assert answer(assets, "index.html", f'"other", W/{etag}').status == 304
    assert answer(assets, "index.html", "*").status == 304
    assert answer(assets, "index.html", '"other"').status == 200
    # another content, another validator: a browser's cached copy is not reused
    (tmp_path / "index.html").write_text("<!doctype html><p>two</p>", encoding="utf-8")
    changed = load_assets(tmp_path)
    assert answer(changed, "index.html", etag).status == 200


def test_gui_assets_unknown_file_is_a_404_that_names_it() -> None:
    result = answer(load_assets(STATIC_DIR), "nope.js", None)
    assert result.status == 404
    assert b"nope.js" in result.body


def test_gui_assets_refuse_a_file_of_an_unknown_type(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("stray", encoding="utf-8")
    with pytest.raises(AssetError, match=r"notes\.txt: no content type for '\.txt' files"):
        load_assets(tmp_path)


def test_gui_assets_need_an_index(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("", encoding="utf-8")
    with pytest.raises(AssetError, match=r"has no index\.html"):
        load_assets(tmp_path)
