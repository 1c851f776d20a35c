"""The page end to end in headless Chromium (Debian's `chromium`, driven by Playwright), served
in-process on a free loopback port, over a tiny run trained to tell colours apart.

What the page shows is checked against the Python API on the same index (the oracle picks the
scenes; the page must then show exactly the same hits and answer), and against the world's
ground truth (colours, scenes). Set MMEMBED_SCREENSHOTS=DIR to keep the screenshots of each view.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

import mmembed as mm  # noqa: E402
from mmembed.serve import BackgroundServer, Limits, create_app, open_state  # noqa: E402
from tests.serve.conftest import aiff_of, manifest_rows  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    found = os.environ.get("MMEMBED_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and Path(found).exists() else None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need Playwright's Python package (pip install -e '.[dev]')")
    path = chromium_path()
    if path is None:
        pytest.skip("browser tests need Chromium (Debian: apt-get install chromium; or set MMEMBED_CHROMIUM)")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
    except Exception as e:  # noqa: BLE001 - any reason the browser cannot start here is a skip, said once
        playwright.stop()
        pytest.skip(f"Chromium at {path} cannot start here: {str(e).strip().splitlines()[0][:200]}")
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def served(browser, request, tmp_path_factory):
    # looked up here, after the browser started: where none can, nothing is trained for nothing
    trained_run, colour_world = request.getfixturevalue("trained_run"), request.getfixturevalue("colour_world")
    model = mm.load(trained_run)
    memory = tmp_path_factory.mktemp("serve-browser") / "memory.db"
    state = open_state(model, run="tiny-trained", memory=memory, limits=Limits(max_file_bytes=256 * 1024))
    with BackgroundServer(create_app(state)) as url:
        yield SimpleNamespace(url=url, state=state, model=model, world=colour_world, rows=manifest_rows(colour_world))


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served.url)
    page.wait_for_selector("#index-status[data-state='ready']", timeout=120_000)
    yield page
    page.close()


def oracle_search(served, query: mm.Query, k: int = 3) -> list:
    index = served.state.index.ready()
    with served.state.lock:
        return index.search(query, target="image", k=k)


def colours(label: str) -> set[str]:
    return {part.split()[1] for part in label.split("|")}  # "small red circle left|..." → {"red", ...}


def search(page) -> list[dict]:
    """Click Search and return the hits the page drew (after this search, not a previous one)."""
    results = page.locator("#search-results")
    before = int(results.get_attribute("data-searches") or 0)
    page.click("#search-go")
    page.wait_for_selector(f"#search-results[data-searches='{before + 1}']")
    return page.eval_on_selector_all(
        "#search-results .hit",
        "els => els.map(e => ({id: +e.dataset.id, label: e.dataset.label, modality: e.dataset.modality}))")


def drop(page, target: str, path: Path, mime: str) -> None:
    """Drop a file on `target` as a user dragging it from the desktop would."""
    transfer = page.evaluate_handle(
        "([bytes, name, mime]) => { const dt = new DataTransfer(); "
        "dt.items.add(new File([new Uint8Array(bytes)], name, {type: mime})); return dt; }",
        [list(path.read_bytes()), path.name, mime])
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})


def screenshot(page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    keep = os.environ.get("MMEMBED_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(keep) / name)


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ---- search --------------------------------------------------------------------------------------


def test_a_text_search_shows_images_of_that_colour(page, served, tmp_path):
    page.select_option("#search-target", "image")
    page.fill("#search-k", "8")
    for colour in ("blue", "red"):
        page.fill("#search-pieces input.text", f"a small {colour} square on the left")
        hits = search(page)
        expected = oracle_search(served, mm.Query(text=f"a small {colour} square on the left"), k=8)
        assert [h["id"] for h in hits] == [h.id for h in expected]
        assert all(h["modality"] == "image" for h in hits)
        assert colour in colours(hits[0]["label"]) and sum(colour in colours(h["label"]) for h in hits[:3]) >= 2
    page.wait_for_function("() => [...document.querySelectorAll('#search-results .hit img')].slice(0, 3)"
                           ".every(e => e.complete && e.naturalWidth > 0)")  # the rest load lazily, when scrolled to
    widths = page.eval_on_selector_all("#search-results .hit img", "els => els.slice(0, 3).map(e => e.naturalWidth)")
    assert widths == [32, 32, 32]  # the thumbnails are the world's own 32 px images
    screenshot(page, "serve_search.png", tmp_path)


def test_an_uploaded_sound_finds_images_of_its_scene(page, served):
    row = next(r for r in served.rows  # the oracle: a scene whose sound finds its own picture first
               if oracle_search(served, mm.Query(audio=str(served.world / r["audio"])), k=1)[0].metadata["label"]
               == r["label"])
    page.select_option("#search-target", "image")
    drop(page, "#search-drop", served.world / row["audio"], "audio/wav")  # dragged in, not picked
    assert page.locator("#search-pieces .piece[data-kind='sound'] audio").count() == 1
    hits = search(page)
    expected = oracle_search(served, mm.Query(audio=str(served.world / row["audio"])), k=12)
    assert [h["id"] for h in hits] == [h.id for h in expected]
    assert hits[0]["label"] == row["label"]


def test_a_composed_query_moves_the_top_hit(page, served):
    """image(A) + sound(B) − sound(A): the top hit leaves scene A for a picture with B's colour."""
    single = [r for r in served.rows if "|" not in r["label"]]
    path = lambda r, m: str(served.world / r[m])  # noqa: E731

    def fits(a, b) -> bool:
        if colours(a["label"]) == colours(b["label"]):
            return False
        if oracle_search(served, mm.Query(image=path(a, "image")), k=1)[0].metadata["label"] != a["label"]:
            return False
        top = oracle_search(served, composed(a, b), k=1)[0].metadata["label"]
        return top != a["label"] and colours(top) == colours(b["label"])

    def composed(a, b) -> mm.Query:
        return mm.Query(image=path(a, "image"), audio=[path(b, "audio"), path(a, "audio")],
                        weights={"audio": [1.0, -1.0]})

    a, b = next((a, b) for a in single for b in single if fits(a, b))
    page.select_option("#search-target", "image")
    page.set_input_files("#search-files", path(a, "image"))
    alone = search(page)
    assert alone[0]["label"] == a["label"]
    page.set_input_files("#search-files", [path(b, "audio"), path(a, "audio")])
    page.locator("#search-pieces .piece").nth(3).locator("input.weight").fill("-1")  # text, A.png, B.wav, A.wav
    # a text of U+0085 only is empty to the server (Python's strip) and now to the page: it was sent,
    # dropped by the server, and its weight left over ("4 weights for 3 pieces")
    page.locator("#search-pieces input.text").first.fill("\x85")
    moved = search(page)
    assert [h["id"] for h in moved] == [h.id for h in oracle_search(served, composed(a, b), k=12)]
    assert moved[0]["label"] != a["label"] and colours(moved[0]["label"]) == colours(b["label"])


# ---- prompt ----------------------------------------------------------------------------------------


def test_a_mixed_prompt_streams_an_answer_naming_the_colour(page, served, tmp_path):
    def question(r):
        return f"What colour is the {r['objects'][0]['shape']} in"

    def answers(r) -> bool:
        prompt = [question(r), mm.Image(str(served.world / r["image"])), "?"]
        with served.state.lock:
            return served.model.generate(prompt, max_new_tokens=4).text.strip() == r["objects"][0]["colour"]

    row = next(r for r in served.rows if "|" not in r["label"] and answers(r))
    colour = row["objects"][0]["colour"]
    page.click("#tab-prompt")
    page.fill("#prompt-pieces input.text", question(row))
    page.set_input_files("#prompt-files", str(served.world / row["image"]))
    page.click("#prompt-add-text")
    page.locator("#prompt-pieces input.text").nth(1).fill("?")
    page.fill("#prompt-temperature", "0")
    page.fill("#prompt-max-tokens", "4")
    with page.expect_response("**/api/generate/stream") as response:
        page.click("#prompt-go")
    assert response.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector("#answer[data-state='done']")
    answer = page.inner_text("#answer").strip()
    assert answer == colour
    tips = page.eval_on_selector_all("#answer .tok", "els => els.map(e => e.dataset.tip)")
    assert tips and all("entropy 0.000 nats" in t and "model's own" in t for t in tips)  # greedy: drawn from a point
    colour_of = "h => { const s = document.createElement('span'); s.style.background = entropyColour(h); " \
                "return s.style.background; }"
    backgrounds = "els => els.map(e => e.style.background)"
    assert page.eval_on_selector_all("#answer .tok", backgrounds) == [page.evaluate(colour_of, 0.0)] * len(tips)
    page.select_option("#prompt-colour-by", "model")
    own = page.eval_on_selector_all("#answer .tok", "els => els.map(e => +e.dataset.model)")
    assert page.eval_on_selector_all("#answer .tok", backgrounds) == [page.evaluate(colour_of, h) for h in own]
    page.hover("#answer .tok >> nth=0")
    shown = page.eval_on_selector("#answer .tok", "e => getComputedStyle(e, '::after').content")
    assert "model's own" in shown  # the values appear on hover
    screenshot(page, "serve_prompt.png", tmp_path)

    # best of 4: whole answers from /api/generate, the chosen one shown with every candidate's scores
    page.fill("#prompt-temperature", "1")
    page.fill("#prompt-seed", "0")
    page.fill("#prompt-best-of", "4")
    with page.expect_response("**/api/generate") as response:
        page.click("#prompt-go")
    page.wait_for_selector("#answer[data-state='done']")
    prompt = [question(row), mm.Image(str(served.world / row["image"])), "?"]
    with served.state.lock:
        expected = served.model.generate(prompt, max_new_tokens=4, temperature=1.0, top_p=0.9, seed=0, best_of=4)
    assert page.inner_text("#answer") == expected.text
    cells = page.eval_on_selector_all("#candidates tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert cells == [c.text for c in expected.candidates] and page.locator("#candidates tr.chosen").count() == 1


# ---- hostile files ---------------------------------------------------------------------------------


def test_bad_files_show_an_error_and_the_server_keeps_serving(page, served):
    bad = [({"name": "huge.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n" + bytes(300 * 1024)},
            "huge.png is too large"),
           ({"name": "notes.png", "mimeType": "image/png", "buffer": b"<html><body>not a picture</body></html>"},
            "notes.png is not a file this server reads"),
           ({"name": "bomb.png", "mimeType": "image/png", "buffer": png_header(30000, 30000)},
            "decompression bomb")]
    error = page.locator("#search-error")
    for payload, message in bad:
        page.set_input_files("#search-files", files=[payload])
        page.click("#search-go")
        page.wait_for_function("m => document.querySelector('#search-error').textContent.includes(m)", arg=message)
        assert error.is_visible()
        page.locator("#search-pieces .piece[data-kind='image'] button.remove").click()
    page.fill("#search-pieces input.text", "a small red square on the left")
    hits = search(page)
    assert len(hits) == 12 and error.is_hidden()
    page.click("#tab-prompt")
    page.set_input_files("#prompt-files", files=[bad[1][0]])
    page.click("#prompt-go")
    page.wait_for_function("() => document.querySelector('#prompt-error').textContent.includes('notes.png')")
    assert page.evaluate("fetch('/api/status').then(r => r.status)") == 200


# ---- memory ----------------------------------------------------------------------------------------


def test_the_memory_view_shows_what_a_turn_recalled_and_forgets(page, served, tmp_path):
    row = next(r for r in served.rows if "|" not in r["label"])
    image = str(served.world / row["image"])
    page.click("#tab-memory")
    page.fill("#memory-user", "ada")
    page.fill("#memory-pieces input.text", "this is my favourite picture")
    page.set_input_files("#memory-files", image)
    with page.expect_response("**/api/memory/remember"):
        page.click("#memory-remember")
    items = page.locator("#memory-items .item")
    items.first.wait_for()
    assert items.count() == 2
    page.fill("#memory-pieces input.text", f"What colour is the {row['objects'][0]['shape']} in")
    page.set_input_files("#memory-files", image)
    with page.expect_response("**/api/memory/ask") as asked:
        page.click("#memory-ask")
    recalled = {h["id"] for h in asked.value.json()["recalled"]}
    page.wait_for_selector("#memory-items .item.recalled")
    shown = set(page.eval_on_selector_all("#memory-items .item.recalled", "els => els.map(e => +e.dataset.id)"))
    assert shown == recalled and len(recalled) >= 1
    picture = page.eval_on_selector_all("#memory-items .item[data-modality='image'] img",
                                        "els => els.map(e => e.complete && e.naturalWidth)")
    assert picture and all(w == 32 for w in picture)
    screenshot(page, "serve_memory.png", tmp_path)
    before = page.locator("#memory-items .item").count()
    victim = page.locator("#memory-items .item.recalled").first
    victim_id = victim.get_attribute("data-id")
    asked = []
    page.once("dialog", lambda dialog: asked.append(dialog.message) or dialog.dismiss())  # "Cancel": nothing goes
    victim.locator("button.forget").click()
    assert asked == [f"Forget item #{victim_id} of ada?"] and page.locator("#memory-items .item").count() == before
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_response(lambda r: r.request.method == "DELETE"):
        victim.locator("button.forget").click()
    page.wait_for_function(f"() => !document.querySelector(\"#memory-items .item[data-id='{victim_id}']\")")
    assert page.locator("#memory-items .item").count() == before - 1
    with served.state.lock:
        assert all(h.id != int(victim_id) for h in served.state.memory.recent("ada", limit=100))


def test_a_memory_error_goes_once_a_list_loads(page, served):
    """refreshMemory never cleared the error box: a refused name's message stayed under the next user's list."""
    page.click("#tab-memory")
    page.wait_for_selector("#memory-items[data-refreshes='1']", state="attached")  # the view's own first list
    page.fill("#memory-user", "bad\u0007name")
    page.click("#memory-refresh")
    page.wait_for_function("() => document.querySelector('#memory-error').textContent.includes('printable')")
    page.fill("#memory-user", "grace")
    page.click("#memory-refresh")
    page.wait_for_selector("#memory-items[data-refreshes='2']", state="attached")
    assert page.locator("#memory-error").is_hidden() and page.text_content("#memory-info").endswith("for grace")


def show_items(page, user: str) -> None:
    """Show `user`'s list in the memory view and wait until it is drawn."""
    items = page.locator("#memory-items")
    before = int(items.get_attribute("data-refreshes") or 0)
    page.fill("#memory-user", user)
    page.click("#memory-refresh")
    page.wait_for_selector(f"#memory-items[data-refreshes='{before + 1}']", state="attached")


def test_a_memory_item_the_page_cannot_play_says_what_it_is(page, served):
    """An AIFF sound, or a sound stored as a path, came with no `media` and was drawn as an empty card."""
    wav = served.world / next(r["audio"] for r in served.rows if r.get("audio"))
    with served.state.lock:
        memory = served.state.memory
        ids = {"aiff": memory.add("ivy", mm.Audio(aiff_of(wav.read_bytes()))),
               "captioned": memory.add("ivy", mm.Audio(aiff_of(wav.read_bytes())), text="a caption"),
               "path": memory.add("ivy", mm.Audio(str(wav)), store_media="path"),
               "played": memory.add("ivy", mm.Audio(str(wav))),
               "note": memory.add("ivy", text="a note")}
    page.click("#tab-memory")
    page.wait_for_selector("#memory-items[data-refreshes='1']", state="attached")
    show_items(page, "ivy")
    cards = {int(c["id"]): c for c in page.eval_on_selector_all("#memory-items .item", """els => els.map(e => ({
        id: e.dataset.id, caption: e.querySelector('figcaption').textContent, audio: !!e.querySelector('audio'),
        quote: e.querySelector('blockquote')?.textContent ?? null,
        unplayable: e.querySelector('.unplayable')?.textContent ?? null}))""")}
    for name in ("aiff", "captioned", "path"):
        card = cards[ids[name]]
        assert " audio " in card["caption"] and not card["audio"], card
        assert card["unplayable"] == "this sound cannot be played in the browser", card
    assert cards[ids["captioned"]]["quote"] == "a caption" and cards[ids["aiff"]]["quote"] is None
    played, note = cards[ids["played"]], cards[ids["note"]]
    assert " audio " in played["caption"] and played["audio"] and played["unplayable"] is None
    assert " text " in note["caption"] and note["quote"] == "a note" and note["unplayable"] is None


def test_another_users_list_is_not_said_to_be_highlighted(page, served):
    """After an Ask as one user, the next user's list still said "highlighted: recalled by the last turn",
    under the first user's answer."""
    image = str(served.world / next(r for r in served.rows if "|" not in r["label"])["image"])
    with served.state.lock:
        served.state.memory.add("judy", mm.Image(image), text="my picture")
    page.click("#tab-memory")
    page.wait_for_selector("#memory-items[data-refreshes='1']", state="attached")
    page.fill("#memory-user", "judy")
    page.fill("#memory-pieces input.text", "What colour is it?")
    page.set_input_files("#memory-files", image)
    with page.expect_response("**/api/memory/ask") as asked:
        page.click("#memory-ask")
    assert asked.value.json()["recalled"]
    page.wait_for_selector("#memory-items .item.recalled")
    assert page.text_content("#memory-info").endswith(" · highlighted: recalled by the last turn")
    assert page.is_visible("#memory-answer")
    show_items(page, "kim")
    assert page.text_content("#memory-info") == "0 item(s) remembered for kim"
    assert not page.is_visible("#memory-answer")  # judy's answer stayed above kim's list
    with served.state.lock:
        served.state.memory.add("kim", text="kim's note")
    show_items(page, "kim")
    assert page.text_content("#memory-info") == "1 item(s) remembered for kim"
    assert page.locator("#memory-items .item.recalled").count() == 0
    show_items(page, "judy")  # judy's last turn still recalled them
    assert page.text_content("#memory-info").endswith(" · highlighted: recalled by the last turn")
    assert page.is_visible("#memory-answer")
    assert page.locator("#memory-items .item.recalled").count() == len(asked.value.json()["recalled"])


def held_until_released(page, pattern: str) -> list:
    """Hold each request matching `pattern` (a slow server): the test answers it with `continue_()`."""
    held: list = []
    page.route(pattern, lambda route: held.append(route))
    return held


def wait_for(page, condition) -> None:
    for _ in range(TIMEOUT_MS // 50):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError("timed out")


def test_enter_in_the_user_box_shows_that_users_list_and_only_the_latest_list_is_drawn(page, served):
    """Enter in the user box submitted the form: "Ask" stored the pending pieces under the new name;
    and a slower list of the previous user, answered last, was drawn (and Forget deleted) under the new one."""
    with served.state.lock:
        served.state.memory.add("alice", text="alice's secret")
        served.state.memory.add("dave", text="dave's note")
    page.click("#tab-memory")
    page.wait_for_selector("#memory-items[data-refreshes='1']", state="attached")
    held = held_until_released(page, "**/api/memory?user=alice*")
    page.fill("#memory-user", "alice")
    page.click("#memory-refresh")
    wait_for(page, lambda: held)
    page.fill("#memory-pieces input.text", "not to be asked")
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/api/memory/ask" in r.url else None)
    page.fill("#memory-user", "dave")
    page.press("#memory-user", "Enter")
    page.wait_for_selector("#memory-items[data-refreshes='2']", state="attached")
    with page.expect_event("requestfinished", lambda r: "user=alice" in r.url):
        held[0].continue_()
    page.wait_for_timeout(300)  # time for the page to draw alice's answer, had it kept it
    shown = page.eval_on_selector_all("#memory-items blockquote", "els => els.map(e => e.textContent)")
    assert shown == ["dave's note"] and page.text_content("#memory-info").endswith("for dave")
    assert asked == [] and page.input_value("#memory-pieces input.text") == "not to be asked"
    assert served.state.memory.count("dave") == 1


def test_pieces_added_while_remember_runs_are_kept(page, served):
    """Remember cleared every piece once it answered: those added while it ran were lost too."""
    page.click("#tab-memory")
    page.fill("#memory-user", "erin")
    page.fill("#memory-pieces input.text", "sent")
    held = held_until_released(page, "**/api/memory/remember")
    page.click("#memory-remember")
    wait_for(page, lambda: held)
    page.click("#memory-add-text")
    page.locator("#memory-pieces input.text").nth(1).fill("typed meanwhile")
    held[0].continue_()
    page.wait_for_function("() => document.querySelector('#memory-info').textContent.startsWith('1 item(s)')")
    typed = page.eval_on_selector_all("#memory-pieces input.text", "els => els.map(e => e.value)")
    assert typed == ["typed meanwhile"] and [h.text for h in served.state.memory.recent("erin")] == ["sent"]


# ---- header ----------------------------------------------------------------------------------------


def test_a_hidden_tabs_view_is_never_shown(browser, served):
    """/#memory on a server without --memory showed the memory view, its tab hidden."""
    with BackgroundServer(create_app(open_state(served.model, run="tiny-trained"))) as url:
        page = browser.new_page()
        try:
            page.goto(url + "#memory")
            page.wait_for_selector("#index-status[data-state]", state="attached", timeout=TIMEOUT_MS)
            assert page.is_hidden("#tab-memory") and page.is_hidden("#view-memory")
            assert page.is_visible("#view-search") and page.get_attribute("#tab-search", "aria-selected") == "true"
        finally:
            page.close()


def test_a_run_whose_decoder_has_not_finished_says_so_before_a_prompt(browser, served, tmp_path):
    """The Prompt view and the memory's Ask stayed enabled on a run without a decoder, and a
    submitted prompt was told "this run has no decoder", though the run's config had one."""
    import copy

    model = copy.copy(served.model)
    model.prompt_model = None  # as `mm.load` leaves a run whose decoder.safetensors is not written yet
    state = open_state(model, run="tiny-trained", memory=tmp_path / "memory.db")
    with BackgroundServer(create_app(state)) as url:
        page = browser.new_page()
        try:
            page.goto(url + "#prompt")
            page.wait_for_selector("#prompt-error:not([hidden])", timeout=TIMEOUT_MS)
            reason = page.text_content("#prompt-error")
            assert reason.startswith(f"the decoder stage of {served.model.run_dir} has not finished"), reason
            assert page.is_disabled("#prompt-go") and page.is_disabled("#memory-ask")
            assert page.get_attribute("#prompt-go", "title") == reason
            page.click("#tab-memory")
            page.fill("#memory-pieces input.text", "remember this")
            with page.expect_response("**/api/memory/remember") as remembered:
                page.click("#memory-remember")  # remembering needs no decoder; Ask stays off after it
            assert remembered.value.status == 200, remembered.value.text()
            page.locator("#memory-items .item").first.wait_for()
            assert page.is_disabled("#memory-ask") and page.is_enabled("#memory-remember")
        finally:
            page.close()
        state.memory.close()


def test_an_index_folder_given_with_a_trailing_slash_is_named(browser, served, tmp_path):
    """`--index idx/` showed "index: ... ()": the name was taken after the path's last slash."""
    mm.Index.build(served.model, served.world / "test.jsonl", progress=False).save(tmp_path / "idx")
    state = open_state(served.model, run="tiny-trained", index=f"{tmp_path / 'idx'}/")
    with BackgroundServer(create_app(state)) as url:
        page = browser.new_page()
        try:
            page.goto(url)
            page.wait_for_selector("#index-status[data-state='ready']", timeout=TIMEOUT_MS)
            assert page.text_content("#index-text").endswith("(idx)")
        finally:
            page.close()


class Answers:
    """ASGI middleware keeping (path, status) of every answer: Chromium's own icon request is seen
    neither by Playwright nor by the page's DevTools session, only by the server."""

    def __init__(self, app, answered: list) -> None:
        self.app, self.answered = app, answered

    async def __call__(self, scope, receive, send) -> None:
        async def sent(message) -> None:
            if message["type"] == "http.response.start":
                self.answered.append((scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, sent)


def test_loading_the_page_logs_no_console_error(browser, served):
    """Every load logged an error: the browser's request for /favicon.ico was a 404."""
    answered: list = []
    app = create_app(open_state(served.model, run="tiny-trained"))
    app.add_middleware(Answers, answered=answered)
    with BackgroundServer(app) as url:
        page = browser.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(url)
            page.wait_for_selector("#index-status[data-state='ready']", timeout=TIMEOUT_MS)
            wait_for(page, lambda: any("favicon" in path for path, _ in answered))  # asked once the page loaded
            page.wait_for_timeout(300)  # time for a late error to be logged
            assert errors == [] and [a for a in answered if a[1] >= 400] == []
            assert ("/static/favicon.svg", 200) in answered
            kind = "fetch('/static/favicon.svg').then(r => r.headers.get('content-type'))"
            assert page.evaluate(kind) == "image/svg+xml"
        finally:
            page.close()
