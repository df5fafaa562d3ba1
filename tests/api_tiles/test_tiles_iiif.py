"""IIIF Image API 3.0 and Deep Zoom over a converted CT series (issue 6 §1).

Tiles are checked against the pyramid itself: decode the PNG and compare with the
windowed zarr region of the level the tile maps to.
"""

from __future__ import annotations

import io
import math
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import pytest
import zarr
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from api.iiif import MAX_AREA, TILE
from processing.render import PRESETS, Window, apply_window

from .tiles_data import COLUMNS, ROWS, SLICES, Converted

ABDOMEN = Window(40, 400)  # the first stored window of the synthetic CT


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def _level(conv: Converted, k: int) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{conv.image_path}/{k}", mode="r")[:])


def _id(conv: Converted, plane: str = "axial", index: int = 12, *, version: bool = True,
        window: str = "") -> str:
    v = f"@{conv.version}" if version else ""
    w = f":{window}" if window else ""
    return f"{conv.series_uid}{v}:0:{plane}:{index}{w}"


def check_info(info: dict[str, Any], levels: int) -> None:
    """The IIIF Image API 3.0 §5 rules for an info.json of a level-2 service."""
    assert info["@context"] == "http://iiif.io/api/image/3/context.json"
    assert info["type"] == "ImageService3"
    assert info["protocol"] == "http://iiif.io/api/image"
    assert info["profile"] == "level2"
    assert info["id"].startswith("http") and "/iiif/" in info["id"]
    w, h = info["width"], info["height"]
    assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
    # §5.3 sizes: whole-image sizes, none larger than the image or maxArea
    for s in info["sizes"]:
        assert 0 < s["width"] <= w and 0 < s["height"] <= h
        assert s["width"] * s["height"] <= info.get("maxArea", math.inf)
    # §5.4 tiles: width (and height), and scale factors = the pyramid levels
    (tiles,) = info["tiles"]
    assert tiles["width"] == tiles["height"] == TILE
    assert tiles["scaleFactors"] == [1 << k for k in range(levels)]
    for f in tiles["scaleFactors"]:
        assert {"width": math.ceil(w / f), "height": math.ceil(h / f)} in info["sizes"]
    assert set(info["extraFormats"]) <= {"png", "jpg", "webp"}
    assert set(info.get("extraQualities", [])) <= {"color", "gray", "bitonal", "default"}


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_info_json_follows_iiif_image_3(client: TestClient, converted: Converted,
                                        plane: str) -> None:
    attrs: dict[str, Any] = dict(zarr.open_group(converted.image_path, mode="r").attrs)
    levels = len(attrs["ome"]["multiscales"][0]["datasets"])
    assert levels == 3
    r = client.get(f"/iiif/{_id(converted, plane, 5)}/info.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["access-control-allow-origin"] == "*"
    info = r.json()
    check_info(info, levels)
    assert info["id"].endswith(f"/iiif/{_id(converted, plane, 5)}")
    if plane == "axial":
        assert (info["width"], info["height"]) == (COLUMNS, ROWS)
    else:  # physical aspect: z (1.25 mm) resampled to the 0.7 mm in-plane pixel
        assert (info["width"], info["height"]) == (COLUMNS, round(SLICES * 1.25 / 0.7))
    ld = client.get(f"/iiif/{_id(converted, plane, 5)}/info.json",
                    headers={"Accept": "application/ld+json"})
    assert ld.headers["content-type"].startswith("application/ld+json")
    assert 'profile="http://iiif.io/api/image/3/context.json"' in ld.headers["content-type"]


def test_unversioned_info_points_at_the_current_version(client: TestClient,
                                                         converted: Converted) -> None:
    r = client.get(f"/iiif/{_id(converted, version=False)}/info.json")
    assert r.status_code == 200
    assert r.json()["id"].endswith(_id(converted))
    assert r.headers["cache-control"] == "no-cache"
    base = client.get(f"/iiif/{_id(converted)}", follow_redirects=False)
    assert base.status_code == 303 and base.headers["location"].endswith("/info.json")


def test_info_json_id_never_comes_from_the_host_header(client: TestClient,
                                                       converted: Converted) -> None:
    """info.json's ``id`` (which a viewer then requests tiles from) is built from the
    local address or ``http.public_url``, never a forged ``Host`` (issue 14.9)."""
    forged = {"Host": "evil.example:666", "X-Forwarded-Host": "evil.example"}
    for image in (_id(converted), _id(converted, version=False)):
        r = client.get(f"/iiif/{image}/info.json", headers=forged)
        assert r.status_code == 200, r.text
        assert "evil" not in r.text
        # TestClient's ASGI scope["server"] is ("testserver", 80)
        assert r.json()["id"].startswith("http://testserver/iiif/"), r.json()["id"]


def test_every_tile_of_every_level_equals_the_windowed_pyramid(
        client: TestClient, converted: Converted) -> None:
    index = 13
    for k in range(3):
        level = _level(converted, k)
        z = index // (level.shape[0] and SLICES // level.shape[0])
        plane = level[min(z, level.shape[0] - 1)]
        sf = 1 << k
        for ty in range(math.ceil(plane.shape[0] / TILE)):
            for tx in range(math.ceil(plane.shape[1] / TILE)):
                x, y = tx * TILE * sf, ty * TILE * sf
                w, h = min(TILE * sf, COLUMNS - x), min(TILE * sf, ROWS - y)
                tw, th = math.ceil(w / sf), math.ceil(h / sf)
                url = f"/iiif/{_id(converted, index=index)}/{x},{y},{w},{h}/{tw},{th}/0/default.png"
                r = client.get(url)
                assert r.status_code == 200, (url, r.text)
                got = _png(r.content)
                want = apply_window(plane[ty * TILE:ty * TILE + th, tx * TILE:tx * TILE + tw],
                                    ABDOMEN)
                assert got.shape == (th, tw)
                assert np.array_equal(got, want), (k, tx, ty)


def test_raw_16_bit_png_is_the_stored_values(client: TestClient, converted: Converted) -> None:
    level = _level(converted, 1)
    r = client.get(f"/iiif/{_id(converted, index=12, window='raw')}/0,0,512,512/256,256/0/"
                   "default.png")
    assert r.status_code == 200, r.text
    offset = int(r.headers["x-pacslab-value-offset"])
    got = _png(r.content).astype(np.int32) + offset
    assert np.array_equal(got, level[6, :256, :256].astype(np.int32))
    assert client.get(f"/iiif/{_id(converted, window='raw')}/full/max/0/default.jpg"
                      ).status_code == 400


@pytest.mark.parametrize(("window", "expected"), [
    ("lung", PRESETS["lung"]), ("bone", PRESETS["bone"]), ("-100,50", Window(-100, 50)),
])
def test_window_query_and_presets(client: TestClient, converted: Converted, window: str,
                                  expected: Window) -> None:
    level = _level(converted, 2)
    r = client.get(f"/iiif/{_id(converted, index=12)}/full/150,150/0/default.png",
                   params={"window": window})
    assert r.status_code == 200
    assert np.array_equal(_png(r.content), apply_window(level[3], expected))
    in_id = client.get(f"/iiif/{_id(converted, index=12, window=window)}/full/150,150/0/"
                       "default.png")
    assert in_id.content == r.content


def test_sizes_regions_rotation_and_formats(client: TestClient, converted: Converted) -> None:
    base = f"/iiif/{_id(converted)}"
    full = _png(client.get(f"{base}/full/max/0/default.png").content)
    assert full.shape == (ROWS, COLUMNS)
    assert _png(client.get(f"{base}/full/300,/0/default.png").content).shape == (300, 300)
    assert _png(client.get(f"{base}/full/,150/0/gray.png").content).shape == (150, 150)
    assert _png(client.get(f"{base}/full/pct:25/0/default.png").content).shape == (150, 150)
    assert _png(client.get(f"{base}/full/!200,100/0/default.png").content).shape == (100, 100)
    assert _png(client.get(f"{base}/square/100,100/0/default.png").content).shape == (100, 100)
    assert _png(client.get(f"{base}/full/^900,/0/default.png").content).shape == (900, 900)
    pct = _png(client.get(f"{base}/pct:50,50,50,50/max/0/default.png").content)
    assert np.array_equal(pct, full[300:, 300:])
    region = _png(client.get(f"{base}/10,20,100,50/max/0/default.png").content)
    assert np.array_equal(region, full[20:70, 10:110])
    rot = _png(client.get(f"{base}/10,20,100,50/max/90/default.png").content)
    assert np.array_equal(rot, np.rot90(full[20:70, 10:110], k=-1))
    mirrored = _png(client.get(f"{base}/10,20,100,50/max/!180/default.png").content)
    assert np.array_equal(mirrored, np.rot90(full[20:70, 10:110][:, ::-1], k=2))
    for fmt, media in (("jpg", "image/jpeg"), ("webp", "image/webp")):
        r = client.get(f"{base}/0,0,256,256/256,256/0/default.{fmt}")
        assert r.status_code == 200 and r.headers["content-type"] == media
        assert Image.open(io.BytesIO(r.content)).size == (256, 256)
    webp = np.asarray(Image.open(io.BytesIO(
        client.get(f"{base}/0,0,256,256/256,256/0/default.webp").content)).convert("L"))
    assert np.array_equal(webp, full[:256, :256])  # lossless


@pytest.mark.parametrize(("path", "status"), [
    ("full/max/0/default.tif", 501),
    ("full/max/45/default.png", 501),
    ("full/max/0/default.gif", 501),  # bitonal is produced now (level 2, issue 13)
    ("full/max/0/color.png", 404),  # greyscale image: no colour quality (§7: 404)
    ("full/max/0/default.bmp", 400),
    ("full/max/0/fancy.png", 400),
    ("full/601,/0/default.png", 400),  # upscaling without ^
    ("full/0,/0/default.png", 400),
    ("700,0,10,10/max/0/default.png", 400),  # outside the image
    ("0,0,0,10/max/0/default.png", 400),
    ("a,b,c,d/max/0/default.png", 400),
    ("full/max/360/default.png", 400),
    ("full/^5000,5000/0/default.png", 404),  # beyond maxArea
    # hostile numbers: unicode digits, thousands of digits, signs (issue 14.8: never 500)
    ("\u00b2,0,1,1/max/0/default.png", 400),
    ("\u0661,0,1,1/max/0/default.png", 400),  # ARABIC-INDIC DIGIT ONE
    ("1" * 5000 + ",0,1,1/max/0/default.png", 400),
    ("0,0,1,1/" + "9" * 5000 + ",/0/default.png", 400),
    ("pct:" + "1" * 5000 + ",0,1,1/max/0/default.png", 400),
    ("pct:\u00b9,0,1,1/max/0/default.png", 400),
    ("full/pct:\u0665\u0660/0/default.png", 400),
    ("full/!\u00b2,2/0/default.png", 400),
    ("full/max/" + "9" * 5000 + "/default.png", 400),
    ("full/max/\u0669\u0660/default.png", 400),
    ("full/max/-90/default.png", 400),
    ("-1,0,10,10/max/0/default.png", 400),
    ("full/max/0/default." + "p" * 5000, 400),
])
def test_iiif_errors_are_problem_json(client: TestClient, converted: Converted, path: str,
                                      status: int) -> None:
    r = client.get(f"/iiif/{_id(converted)}/{path}")
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["title"] and body["instance"].startswith("/iiif/")


# Malformed ids were 400 before issue 13.9: IIIF Image API 3.0 §7 says an identifier
# that names no image is 404, whatever its syntax (the iiif-validator checks it).
@pytest.mark.parametrize(("image", "status"), [
    ("1.2.3:0:axial:0", 404),  # unknown series
    ("{uid}@999999:0:axial:0", 404),  # unknown version
    ("{uid}:7:axial:0", 404),  # unknown stack
    ("{uid}:0:axial:24", 404),  # slice beyond the depth
    ("{uid}:0:native:0", 200),  # a volume's native plane
    ("{uid}:0:oblique:0", 404),
    ("{uid}:0:axial", 404),
    ("not-a-uid:0:axial:0", 404),
    ("{uid}:0:axial:0:nonsense", 404),
    ("{uid}:0:axial:\u00b9\u00b2", 404),  # superscript digits pass str.isdigit
    ("{uid}:\u0660:axial:0", 404),
    ("{uid}@" + "9" * 5000 + ":0:axial:0", 404),
    ("{uid}:0:axial:" + "1" * 5000, 404),
    ("1." + "2" * 5000 + ":0:axial:0", 404),
    ("{uid}:0:axial:0:\u0664\u0660,400", 404),  # unicode digits in the window
    ("[frob]", 404),
])
def test_image_ids(client: TestClient, converted: Converted, image: str, status: int) -> None:
    r = client.get(f"/iiif/{image.format(uid=converted.series_uid)}/info.json")
    assert r.status_code == status, r.text
    if status != 200:
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["cache-control"] == "no-store"


def test_etag_and_304(client: TestClient, converted: Converted) -> None:
    url = f"/iiif/{_id(converted)}/0,0,256,256/256,256/0/default.png"
    r = client.get(url)
    etag = r.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    # equivalent requests (IIIF §4.7 canonical form) share the tag
    same = client.get(f"/iiif/{_id(converted)}/0,0,256,256/max/0/default.png")
    assert same.headers["etag"] == etag
    # another window, another representation
    lung = client.get(url, params={"window": "lung"})
    assert lung.headers["etag"] != etag
    # the newest version, unpinned: cached but revalidated
    latest = client.get(f"/iiif/{_id(converted, version=False)}/0,0,256,256/256,256/0/"
                        "default.png")
    assert latest.headers["cache-control"] == "no-cache"
    assert latest.headers["etag"] == etag and latest.content == r.content


def test_reslice_planes_have_physical_aspect(client: TestClient, converted: Converted) -> None:
    level0 = _level(converted, 0).astype(np.float64)  # z ascending = inferior → superior
    height = round(SLICES * 1.25 / 0.7)
    y = 300
    r = client.get(f"/iiif/{_id(converted, 'coronal', y)}/full/max/0/default.png")
    got = _png(r.content)
    assert got.shape == (height, COLUMNS)
    # independent resampling: display row j is at z = (j + .5)·0.7/1.25 − .5, superior up
    pos = (SLICES - 1) - ((np.arange(height) + 0.5) * 0.7 / 1.25 - 0.5)
    pos = np.clip(pos, 0, SLICES - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, SLICES - 1)
    t = (pos - lo)[:, None]
    coronal = level0[lo, y, :] * (1 - t) + level0[hi, y, :] * t
    want = apply_window(np.rint(coronal).astype(np.int16), ABDOMEN)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    sag = _png(client.get(f"/iiif/{_id(converted, 'sagittal', 300)}/full/max/0/default.png"
                          ).content)
    assert sag.shape == (height, ROWS)
    sag_want = level0[lo, :, 300] * (1 - t) + level0[hi, :, 300] * t
    assert np.abs(sag.astype(int) - apply_window(np.rint(sag_want).astype(np.int16),
                                                 ABDOMEN).astype(int)).max() <= 1
    # a coronal tile of level 1 comes from level 1 (z already halved there)
    r1 = client.get(f"/iiif/{_id(converted, 'coronal', y)}/0,0,512,{height}/256,"
                    f"{math.ceil(height / 2)}/0/default.png")
    assert r1.status_code == 200 and _png(r1.content).shape == (math.ceil(height / 2), 256)


def test_dzi_descriptor_and_tiles(client: TestClient, converted: Converted) -> None:
    r = client.get(f"/dzi/{_id(converted)}.dzi")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(r.text)
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert root.tag == f"{ns}Image"
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("256", "0", "png")
    size = root.find(f"{ns}Size")
    assert size is not None
    assert (size.get("Width"), size.get("Height")) == (str(COLUMNS), str(ROWS))
    last = math.ceil(math.log2(max(ROWS, COLUMNS)))  # DZI level of the full image
    base = f"/dzi/{_id(converted)}_files"
    for k in range(3):  # DZI level last - k is pyramid level k
        plane = _level(converted, k)[min(12 // (1 << k), SLICES // (1 << k) - 1)]
        for row in range(math.ceil(plane.shape[0] / TILE)):
            for col in range(math.ceil(plane.shape[1] / TILE)):
                t = client.get(f"{base}/{last - k}/{col}_{row}.png")
                assert t.status_code == 200
                want = apply_window(plane[row * TILE:(row + 1) * TILE,
                                          col * TILE:(col + 1) * TILE], ABDOMEN)
                assert np.array_equal(_png(t.content), want), (k, col, row)
                assert t.headers["cache-control"] == "public, max-age=31536000, immutable"
    # below the pyramid: resized from its top level, down to 1×1
    for n in range(last - 2):
        t = client.get(f"{base}/{n}/0_0.png")
        side = math.ceil(COLUMNS / (1 << (last - n)))
        assert _png(t.content).shape == (side, side), n
    assert client.get(f"{base}/{last}/3_0.png").status_code == 404
    assert client.get(f"{base}/{last + 1}/0_0.png").status_code == 404
    assert client.get(f"{base}/{last}/0_0.gif").status_code == 400
    # hostile numbers (issue 14.8): 400, never a 500 from int()
    for bad in ("9" * 5000 + "/0_0.png", f"{last}/{'1' * 5000}_0.png",
                f"{last}/0_{'2' * 5000}.png", "\u00b9/0_0.png", f"{last}/\u0661_0.png",
                f"{last}/-1_0.png", f"{last}/0_0.{'p' * 5000}"):
        t = client.get(f"{base}/{bad}")
        assert t.status_code == 400, (bad[:20], t.status_code)
        assert t.headers["content-type"] == "application/problem+json"
    assert client.get(f"{base}/{last}/0_0.webp").headers["content-type"] == "image/webp"
    lung = client.get(f"{base}/{last}/0_0.png", params={"window": "lung"})
    want = apply_window(_level(converted, 0)[12, :256, :256], PRESETS["lung"])
    assert np.array_equal(_png(lung.content), want)


def test_openapi_lists_tile_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/iiif/{image}/info.json" in paths
    assert "/iiif/{image}/{region}/{size}/{rotation}/{quality_format}" in paths
    assert "/dzi/{image}.dzi" in paths
    assert "/dzi/{image}_files/{level}/{col}_{row}.{fmt}" in paths


def test_metrics_keep_gauges_and_add_tile_histogram(client: TestClient,
                                                    converted: Converted) -> None:
    client.get(f"/iiif/{_id(converted)}/0,0,256,256/256,256/0/default.png")
    text = client.get("/metrics").text
    assert "# TYPE pacslab_instances gauge" in text
    assert "# TYPE pacslab_tile_request_duration_seconds histogram" in text
    # Read as Prometheus reads it: label order within braces carries no meaning
    # (prometheus_client writes them sorted, ``le`` between ``api`` and ``status``).
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["pacslab_tile_request_duration_seconds"].samples
    inf = [s for s in samples if s.name.endswith("_bucket")
           and s.labels == {"api": "iiif", "status": "200", "le": "+Inf"}]
    count = [s for s in samples if s.name.endswith("_count") and s.labels["api"] == "iiif"]
    assert inf and inf[0].value >= 1
    assert count and count[0].value == inf[0].value


def test_sizes_never_exceed_max_area() -> None:
    from api.iiif import info_json

    info = info_json("http://x/iiif/a", 30000, 30000, 8, color=True)
    assert all(s["width"] * s["height"] <= MAX_AREA for s in info["sizes"])
    # bitonal is required at level 2 and listed since issue 13 (§5.5: all but default)
    assert info["extraQualities"] == ["color", "gray", "bitonal"]


_HOSTILE = ("\u00b2", "\u0661", "9" * 5000, "-1", "1e5", "inf", "0x10", "a" * 300, "%0d%0a")


def test_hostile_parameters_never_500(client: TestClient, converted: Converted) -> None:
    """Issue 14.8: every path and query parameter of /iiif, /dzi and the viewer JSON
    answers a 4xx (or a 3xx for the IIIF base URI) to unicode digits, huge numbers,
    signs, exponents and hex, never a 500."""
    i = _id(converted)
    templates = (
        "/iiif/{h}/info.json", "/iiif/{h}", f"/iiif/{i}/{{h}}/max/0/default.png",
        f"/iiif/{i}/pct:{{h}},0,1,1/max/0/default.png", f"/iiif/{i}/full/{{h}}/0/default.png",
        f"/iiif/{i}/full/!{{h}},1/0/default.png", f"/iiif/{i}/full/^pct:{{h}}/0/default.png",
        f"/iiif/{i}/full/max/{{h}}/default.png", f"/iiif/{i}/full/max/0/{{h}}",
        f"/iiif/{i}/full/max/0/default.{{h}}", f"/iiif/{i}/full/max/0/default.png?window={{h}}",
        f"/iiif/{i}/full/max/0/default.png?window=40,{{h}}", "/dzi/{h}.dzi",
        f"/dzi/{i}_files/{{h}}/0_0.png", f"/dzi/{i}_files/9/{{h}}_0.png",
        f"/dzi/{i}_files/9/0_{{h}}.png", f"/dzi/{i}.dzi?format={{h}}",
        "/viewer/api/studies?limit={h}", "/viewer/api/studies/{h}/series",
    )
    for h in _HOSTILE:
        for template in templates:
            url = template.format(h=h)
            status = client.get(url, follow_redirects=False).status_code
            assert 300 <= status < 500, (url[:100], status)
