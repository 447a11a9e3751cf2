"""The whole path: every chapter of _toc.yml executed on `smoke` via the CLI, the book built, and the
site opened in headless Chromium (every page loads, every figure is there, no broken internal link)."""
from __future__ import annotations

import functools
import http.server
import json
import re
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from selenium.webdriver.support.ui import WebDriverWait

from ctrlgen import paths
from ctrlgen.book import toc_chapters

pytestmark = pytest.mark.book
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _chapter_sources() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (ROOT / "chapters").iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def sources_before() -> dict[str, bytes]:
    return _chapter_sources()


@pytest.fixture(scope="module")
def built_site(sources_before) -> Path:
    result = subprocess.run([sys.executable, "-m", "ctrlgen.cli.main", "book", "--profile", "smoke", "--force"],
                            capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert result.returncode == 0, f"book build failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    site = paths.html_dir("smoke")
    assert str(site / "index.html") in result.stdout  # the CLI prints where the book is
    return site


def test_every_chapter_executed_and_recorded(built_site):
    for chapter in toc_chapters():
        notebook = paths.executed_dir("smoke") / f"{chapter}.ipynb"
        assert notebook.is_file(), chapter
        cells = json.loads(notebook.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{chapter}: {errors[:1]}"
        record = json.loads((paths.results_dir("smoke") / f"{chapter}.json").read_text())
        assert record["profile"] == "smoke" and record["metrics"], chapter
        for figure in record["figures"]:
            assert (paths.results_dir("smoke") / figure).is_file()


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def test_ch02_on_smoke_gives_identical_metrics_from_two_empty_caches(built_site, tmp_path):
    """Issue 11: the same profile and seed give the same metrics from another empty cache in another process
    (the book build above started from the session's empty cache). Wall-clock numbers are timings, not metrics."""
    env = {**os.environ, paths.ENV_CACHE: str(tmp_path / "cache"), paths.ENV_OUTPUT: str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-m", "ctrlgen.cli.main", "run", "ch02_background", "--profile", "smoke"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, f"ctrlgen run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    fresh = json.loads((tmp_path / "build" / "results" / "smoke" / "ch02_background.json").read_text())
    built = json.loads((paths.results_dir("smoke") / "ch02_background.json").read_text())
    assert fresh["metrics"] and fresh["timings"]  # something was measured, and the wall times went to timings
    a, b = _flat(built["metrics"]), _flat(fresh["metrics"])
    differ = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k, "absent") != b.get(k, "absent")}
    assert not differ, f"{len(differ)} metrics differ (book build, fresh run): {dict(list(differ.items())[:10])}"
    assert fresh["metrics"] == built["metrics"]


def test_sources_are_never_written_back(built_site, sources_before):
    assert _chapter_sources() == sources_before  # no file changed, none added (no .ipynb, no FAILED copy)


@pytest.fixture(scope="module")
def server(built_site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built_site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a, **k: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                 # nothing but loopback: a CDN script the theme references must not leave the machine
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _pages(site: Path) -> list[str]:
    return sorted(str(p.relative_to(site)) for p in site.rglob("*.html")
                  if not p.relative_to(site).parts[0].startswith("_") and p.name not in ("genindex.html", "search.html"))


def test_every_page_loads_with_its_figures_and_links(built_site, server, browser):
    pages = _pages(built_site)
    expected = {"index.html", "book/intro.html", "book/reproducibility.html", "book/data_licences.html"}
    expected |= {f"chapters/{c}.html" for c in toc_chapters()}
    assert expected <= set(pages), expected - set(pages)
    for page in pages:
        browser.get(f"{server}/{page}")
        WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert browser.title and "404" not in browser.title, page
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        assert not broken, f"{page}: images that did not load: {broken}"
        links = browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        for link in links:
            url = urlparse(link)
            if url.netloc != urlparse(server).netloc or not url.path.endswith(".html"):
                continue
            assert (built_site / unquote(url.path).lstrip("/")).is_file(), f"{page}: broken link {link}"


def test_maths_is_rendered_offline(built_site, server, browser):
    """The site ships its own MathJax: every formula is typeset with no network at all."""
    browser.set_script_timeout(60)
    formulas = "Array.from(document.querySelectorAll('span.math.notranslate, div.math.notranslate'))"
    typeset_pages = set()
    for page in ("book/notation.html", *(f"chapters/{c}.html" for c in toc_chapters())):
        browser.get(f"{server}/{page}")
        total = browser.execute_script(f"return {formulas}.length")
        if not total:
            continue  # Sphinx adds MathJax only to pages with maths
        ready = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "if (!window.MathJax || !MathJax.Hub) { done(false); } else { MathJax.Hub.Queue(() => done(true)); }")
        assert ready, f"{page}: MathJax did not load"
        untypeset = browser.execute_script(
            f"return {formulas}.filter(e => !e.querySelector('.MathJax, .MathJax_Display, .MathJax_SVG')).length")
        assert untypeset == 0, f"{page}: {untypeset} of {total} formulas not typeset"
        typeset_pages.add(page)
    assert {"book/notation.html", "chapters/ch02_background.html"} <= typeset_pages


def test_chapter_pages_show_their_recorded_figures(built_site, server, browser):
    for chapter in toc_chapters():
        record = json.loads((paths.results_dir("smoke") / f"{chapter}.json").read_text())
        browser.get(f"{server}/chapters/{chapter}.html")
        shown = browser.execute_script(
            "return Array.from(document.querySelectorAll('main img, article img')).filter(i => i.naturalWidth > 0).length")
        assert shown >= len(record["figures"]), f"{chapter}: {shown} images shown, {len(record['figures'])} recorded"


def test_chapter_pages_show_the_injected_parameters_only(built_site):
    for chapter in toc_chapters():
        text = (built_site / "chapters" / f"{chapter}.html").read_text()
        assert "Parameters" in text and "smoke" in text, chapter
        assert not re.search(r'class="s2">(&quot;|"|&#34;)mini', text), f"{chapter}: the default parameters are shown"


# --------------------------------------------------------------------------- a chapter's own inputs (no kernel)
@pytest.fixture
def ch02_copy(tmp_path):
    """A copy of the project's chapter 2 and library, to edit; the stamp of a (pretend) run of ch02 that read
    ``ch02.toy.train_steps`` and ``seed``."""
    from ctrlgen.book import chapter_stamp, code_inputs, data_fingerprint
    from ctrlgen.config import load_profile

    (tmp_path / "chapters").mkdir()
    shutil.copy2(ROOT / "chapters" / "ch02_background.py", tmp_path / "chapters")
    shutil.copytree(ROOT / "lib" / "ctrlgen", tmp_path / "lib" / "ctrlgen", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = load_profile("smoke")
    stamp = chapter_stamp("ch02_background", cfg, {"ch02.toy.train_steps", "seed"},
                          code_inputs("ch02_background", tmp_path), data_fingerprint(cfg))
    return tmp_path, stamp


def _append(path: Path, text: str = "\n# an edit\n") -> None:
    with path.open("a") as handle:
        handle.write(text)


def test_editing_a_module_ch02_does_not_import_keeps_it(ch02_copy):
    from ctrlgen.book import stale_reasons
    from ctrlgen.config import load_profile

    root, stamp = ch02_copy
    assert stale_reasons(stamp, "ch02_background", load_profile("smoke"), root) == []
    _append(root / "lib" / "ctrlgen" / "methods" / "baselines" / "dreambooth.py")  # chapter 4's baseline
    _append(root / "lib" / "ctrlgen" / "book.py")
    _append(root / "lib" / "ctrlgen" / "profiles" / "smoke.yaml", "\n# profile values are keyed one by one\n")
    assert stale_reasons(stamp, "ch02_background", load_profile("smoke"), root) == []


def test_editing_a_module_ch02_imports_reexecutes_it(ch02_copy):
    from ctrlgen.book import stale_reasons
    from ctrlgen.config import load_profile

    root, stamp = ch02_copy
    module = root / "lib" / "ctrlgen" / "experiments" / "ch02_background.py"   # imported by the chapter itself
    _append(module)   # a comment: the code is the same (result_cache.code_text), the chapter stays
    assert stale_reasons(stamp, "ch02_background", load_profile("smoke"), root) == []
    _append(module, "\nEDITED = 1\n")
    assert stale_reasons(stamp, "ch02_background", load_profile("smoke"), root) == ["lib/ctrlgen/experiments/ch02_background.py changed"]
    # imported only transitively (base models → training)
    _append(root / "lib" / "ctrlgen" / "training" / "loop.py", "\nEDITED = 1\n")
    reasons = stale_reasons(stamp, "ch02_background", load_profile("smoke"), root)
    assert reasons == ["lib/ctrlgen/experiments/ch02_background.py, lib/ctrlgen/training/loop.py changed"]
    _append(root / "chapters" / "ch02_background.py")
    assert "chapters/ch02_background.py changed" in stale_reasons(stamp, "ch02_background", load_profile("smoke"), root)


def test_only_the_profile_values_ch02_read_count(ch02_copy):
    from ctrlgen.book import stale_reasons
    from ctrlgen.config import load_profile

    root, stamp = ch02_copy
    unread = load_profile("smoke", {"didgen.finetune.steps": "7", "sampling.num_steps": "9"})
    assert stale_reasons(stamp, "ch02_background", unread, root) == []
    read = load_profile("smoke", {"ch02.toy.train_steps": "7"})
    before = load_profile("smoke").ch02.toy.train_steps
    assert stale_reasons(stamp, "ch02_background", read, root) == [
        f"profile values it read changed: ch02.toy.train_steps={before} -> 7"]
    assert stale_reasons(None, "ch02_background", read, root) == ["no record of its inputs"]


def test_a_changed_data_root_reexecutes(ch02_copy, tmp_path, monkeypatch):
    from ctrlgen.book import stale_reasons
    from ctrlgen.config import load_profile

    root, stamp = ch02_copy
    data = tmp_path / "data"
    (data / "isic2018").mkdir(parents=True)
    monkeypatch.setenv(paths.ENV_DATA, str(data))
    assert stale_reasons(stamp, "ch02_background", load_profile("smoke"), root) == ["the data root's contents changed"]


def test_claims_ledger_integrity_on_the_built_records(built_site):
    """Every chapter that ran recorded every claim it registers; a claim whose chapter did not run reads
    "not run" (with its reason) instead of disappearing from the ledger."""
    from ctrlgen.thesis.claims import check_records, load_ledger, load_records, verdicts

    records = load_records("smoke")
    ledger = load_ledger()
    assert check_records(ledger, records) == {}
    ran = {c for c in records}
    out = {v.claim.id: v for v in verdicts(records, ledger)}
    assert set(out) == {c.id for c in ledger}
    for claim in ledger:
        registered = any(claim.registers(chapter) for chapter in ran)
        assert (out[claim.id].verdict == "not run") == (not registered), claim.id
        if not registered:
            assert out[claim.id].reason
