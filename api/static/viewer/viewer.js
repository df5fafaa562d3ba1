/* pacslab viewer: study list, series thumbnails, OpenSeadragon over IIIF Image API 3.0.
 *
 * Image ids are {series}@{version}:{stack}:{plane}:{index}[:{window}] (api/iiif.py):
 * versioned, so every tile is immutable and the browser cache serves repeats.
 * Changing the slice or window keeps the viewport: the next slice is added on top and
 * the previous one removed once the new one is fully loaded (no blank flash).
 *
 * Deep links (an EMR launching the viewer for one patient): /viewer/studies/{study}
 * opens that study, /viewer/studies/{study}/series/{series} also opens that series.
 * Each stack opens in its acquisition plane (the first of stack.planes); reformats are
 * listed only for volumes. No inline script: the page's CSP is script-src 'self'.
 */
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = {
    study: null, series: null, stack: null, plane: null, index: 0, window: "default",
    tilesLoaded: 0, tileErrors: 0, info: null, infoKey: null, swap: 0,
  };

  // Access token (RFC 6750): given once as /viewer#token=…, kept for this tab only and
  // taken out of the address bar; every request (JSON, thumbnails, tiles) carries it.
  const TOKEN_KEY = "pacslab.token";
  const fromHash = location.hash.match(/token=([^&]+)/);
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(fromHash[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const authHeaders = token ? { Authorization: `Bearer ${token}` } : {};

  const viewer = OpenSeadragon({
    id: "osd",
    loadTilesWithAjax: true,
    ajaxHeaders: authHeaders,
    prefixUrl: "/static/vendor/openseadragon/images/",
    showNavigator: false,
    maxZoomPixelRatio: 8,
    visibilityRatio: 0.5,
    animationTime: 0.3,
    imageLoaderLimit: 8,
    crossOriginPolicy: false,
  });
  viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });
  viewer.addHandler("tile-load-failed", (e) => {
    state.tileErrors += 1;
    console.error("tile failed", e.message);
  });

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  }

  class HttpError extends Error {
    constructor(url, status) { super(`${url}: ${status}`); this.status = status; }
  }

  async function json(url) {
    const r = await fetch(url, { headers: authHeaders });
    if (r.status === 401 || r.status === 403) {
      $("status").textContent = SIGN_IN;
    }
    if (!r.ok) throw new HttpError(url, r.status);
    return r.json();
  }

  // /viewer/studies/{study}[/series/{series}]: UIDs are digits and dots (PS3.5 9.1).
  const link = location.pathname.match(
    /^\/viewer\/studies\/([^/]+)(?:\/series\/([^/]+))?\/?$/);
  let deepLink = link ? { study: decodeURIComponent(link[1]),
                          series: link[2] ? decodeURIComponent(link[2]) : null } : null;
  // A share link (issue 17): /viewer/shared#token=pls_…, one study, no UID in the URL.
  // The server says which study it opens; the study list is not offered (it is refused).
  const shared = location.pathname.replace(/\/$/, "") === "/viewer/shared";
  const SIGN_IN = shared ? "This share link has expired or was revoked"
    : "Not signed in: open /viewer#token=<access token>";
  const UID = /^[0-9]+(\.[0-9]+)*$/;

  function notFound(message) {
    $("status").textContent = message;
    $("status").classList.add("error");
    $("series").replaceChildren(text("p", message, "notfound"));
  }

  async function authorizedImage(img, url) {
    const r = await fetch(url, { headers: authHeaders });
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    img.src = URL.createObjectURL(await r.blob());
  }

  function imageId(index) {
    const w = state.window === "default" ? "" : `:${state.window}`;
    return `${state.stack.id}:${state.plane}:${index}${w}`;
  }

  function setStatus() {
    if (!state.stack) return;
    const depth = state.stack.planes[state.plane].depth;
    $("status").textContent =
      `${state.plane} · slice ${state.index + 1}/${depth} · window ${state.window}`;
  }

  // Study list: search fields and pages (issue 21). The server pages newest first and
  // names the next page in a Link header (RFC 8288); the previous pages are kept here.
  const PAGE = 50;
  const listing = { offset: 0, next: null, params: new URLSearchParams() };

  function searchParams() {
    const p = new URLSearchParams();
    const fields = { name: "q-name", patient_id: "q-id", accession: "q-accession",
                     date: "q-date", modality: "q-modality" };
    for (const [key, id] of Object.entries(fields)) {
      const v = $(id).value.trim();
      if (v) p.set(key, v);
    }
    return p;
  }

  function nextLink(header) {
    const m = (header || "").match(/<([^>]+)>\s*;\s*rel="next"/);
    return m ? m[1] : null;
  }

  async function loadStudies(offset = 0) {
    const list = $("studies");
    const p = new URLSearchParams(listing.params);
    p.set("limit", String(PAGE));
    p.set("offset", String(offset));
    const url = `/viewer/api/studies?${p}`;
    const r = await fetch(url, { headers: authHeaders });
    if (r.status === 401 || r.status === 403) {
      $("status").textContent = SIGN_IN;
    }
    if (r.status === 400) {
      list.replaceChildren(text("li", "Search not understood (dates: YYYYMMDD or a range)"));
      return;
    }
    if (!r.ok) throw new HttpError(url, r.status);
    const studies = await r.json();
    listing.offset = offset;
    listing.next = nextLink(r.headers.get("Link"));
    list.replaceChildren();
    for (const s of studies) {
      const b = document.createElement("button");
      b.dataset.uid = s.study_instance_uid;
      b.append(text("strong", s.patient_name || s.patient_id || "(no name)"));
      b.append(text("small", `${s.patient_id || ""} ${s.accession_number || ""}`));
      b.append(text("small", `${s.study_date || ""} ${s.description || ""}`));
      b.append(text("small", `${s.modalities.join(", ")} · ${s.series} series`));
      b.addEventListener("click", () => openStudy(s.study_instance_uid).catch(report));
      const li = document.createElement("li");
      li.append(b);
      list.append(li);
    }
    $("prev").disabled = offset === 0;
    $("next").disabled = !listing.next;
    $("page").textContent = studies.length
      ? `${offset + 1}–${offset + studies.length}` : "";
    $("status").textContent = studies.length ? "Choose a study" : "No studies";
    list.dataset.loads = String(Number(list.dataset.loads || 0) + 1);  // for tests
  }

  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    listing.params = searchParams();
    loadStudies(0).catch(report);
  });
  $("prev").addEventListener("click", () =>
    loadStudies(Math.max(0, listing.offset - PAGE)).catch(report));
  $("next").addEventListener("click", () => {
    if (listing.next) loadStudies(listing.offset + PAGE).catch(report);
  });

  function report(err) {
    console.error(err);
    $("status").textContent = "Could not load the study";
  }

  async function openStudy(uid) {
    document.querySelectorAll("#studies button").forEach(
      (b) => b.classList.toggle("active", b.dataset.uid === uid));
    state.study = uid;
    $("status").classList.remove("error");
    const box = $("series");
    box.replaceChildren();
    let series;
    try {
      series = UID.test(uid) ? await json(`/viewer/api/studies/${uid}/series`) : null;
    } catch (err) {
      if (!(err instanceof HttpError) || err.status !== 404) throw err;
      series = null;
    }
    if (series === null) {
      notFound(`Study not found: ${uid}`);
      return [];
    }
    const buttons = [];
    for (const s of series) {
      if (!s.stacks.length) {
        const b = text("button", `${s.modality} ${s.series_number ?? ""} (not converted)`, "thumb");
        b.dataset.series = s.series_instance_uid;
        b.disabled = true;
        box.append(b);
        continue;
      }
      for (const st of s.stacks) {
        const b = document.createElement("button");
        b.className = "thumb";
        b.dataset.series = s.series_instance_uid;
        b.dataset.stack = String(st.stack);
        const img = document.createElement("img");
        authorizedImage(img, st.thumbnail).catch((e) => console.error(e.message));
        img.alt = `${s.modality} series ${s.series_number ?? ""}`;
        b.append(img, text("span", `${s.modality} ${s.series_number ?? ""} ${s.description || ""}`));
        b.addEventListener("click", () => {
          document.querySelectorAll(".thumb").forEach((t) => t.classList.remove("active"));
          b.classList.add("active");
          openStack(s, st);
        });
        box.append(b);
        buttons.push({ series: s, stack: st, button: b });
      }
    }
    // The diagnostic viewer (OHIF, issue 20) for the same study, in this tab: it reads
    // the token this page keeps (sessionStorage "pacslab.token", same origin, same tab).
    const ohif = text("a", "Open in OHIF (diagnostic viewer)", "ohif");
    ohif.href = `/ohif/viewer?StudyInstanceUIDs=${encodeURIComponent(uid)}`;
    box.append(ohif, exportBox(uid));
    $("status").textContent = series.length ? "Choose a series" : "No series in this study";
    return buttons;
  }

  // Download the study as a ZIP with a DICOMDIR (issue 17.3). fetch() with the token
  // (a plain link could not send it); progress from Content-Length when the server
  // knows the size, else from /export/progress/{id} (de-identified archives).
  function exportBox(uid) {
    const box = document.createElement("div");
    box.className = "export";
    const button = text("button", "Download study (ZIP + DICOMDIR)");
    button.type = "button";
    button.id = "export";
    const label = document.createElement("label");
    const deid = document.createElement("input");
    deid.type = "checkbox";
    deid.id = "export-deid";
    label.append(deid, " De-identify");
    const bar = document.createElement("progress");
    bar.id = "export-progress";
    bar.max = 1;
    bar.value = 0;
    bar.hidden = true;
    const note = text("span", "", "export-note");
    note.id = "export-note";
    button.addEventListener("click", () => {
      button.disabled = true;
      downloadStudy(uid, deid.checked, bar, note)
        .catch((err) => { note.textContent = `Download failed (${err.message})`; })
        .finally(() => { button.disabled = false; });
    });
    box.append(button, label, bar, note);
    return box;
  }

  async function downloadStudy(uid, deidentify, bar, note) {
    const url = `/export/studies/${encodeURIComponent(uid)}` +
      (deidentify ? "?deidentify=true" : "");
    note.textContent = "Preparing…";
    const r = await fetch(url, { headers: authHeaders });
    if (!r.ok) throw new HttpError("export", r.status);
    const id = r.headers.get("X-Export-Id") || "";
    const total = Number(r.headers.get("Content-Length")) || 0;
    bar.hidden = false;
    bar.value = 0;
    let done = 0;
    let poll = null;
    if (!total && id) {
      poll = setInterval(async () => {
        try {
          const p = await json(`/export/progress/${encodeURIComponent(id)}`);
          if (p.instances_total) bar.value = p.instances_done / p.instances_total;
          note.textContent = `${p.instances_done} / ${p.instances_total} instances`;
        } catch (err) { console.error(err.message); }
      }, 500);
    }
    const chunks = [];
    const reader = r.body.getReader();
    try {
      for (;;) {
        const { done: end, value } = await reader.read();
        if (end) break;
        chunks.push(value);
        done += value.length;
        if (total) {
          bar.value = done / total;
          note.textContent = `${(done / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB`;
        }
      }
    } finally {
      if (poll) clearInterval(poll);
    }
    bar.value = 1;
    const blob = new Blob(chunks, { type: "application/zip" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `study-${id || "export"}.zip`;  // no UID or name in the file name
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    note.textContent = `Downloaded ${(done / 1e6).toFixed(1)} MB`;
  }

  async function openLink() {
    const buttons = await openStudy(deepLink.study);
    // Not found (already said), or the user picked another study meanwhile.
    if (state.study !== deepLink.study || $("series").querySelector(".notfound")) return;
    const wanted = deepLink.series;
    const match = wanted ? buttons.find((b) => b.series.series_instance_uid === wanted)
      : buttons[0];
    if (match) {
      match.button.click();
    } else if (wanted && $("series").querySelector(`.thumb[data-series="${CSS.escape(wanted)}"]`)) {
      $("status").textContent = `Series ${wanted} is not converted yet`;
    } else if (wanted) {
      $("status").textContent = `Series not found in this study: ${wanted}`;
      $("status").classList.add("error");
    }
  }

  function openStack(series, stack) {
    state.series = series;
    state.stack = stack;
    const planes = $("planes");
    planes.replaceChildren();
    for (const p of Object.keys(stack.planes)) {
      const b = text("button", p === stack.acquisition_plane && p !== "native" ? `${p} (acquired)` : p);
      b.dataset.plane = p;
      b.addEventListener("click", () => setPlane(p));
      planes.append(b);
    }
    const sel = $("window");
    sel.replaceChildren();
    sel.append(new Option("default", "default"));
    for (const w of stack.windows) sel.append(new Option(w.name, w.window));
    sel.disabled = stack.color;
    state.window = "default";
    setPlane(stack.default_plane);
  }

  async function tileSource(index) {
    // One info.json per plane and window; the other slices differ only in the id.
    const key = `${state.stack.id}:${state.plane}:${state.window}`;
    if (state.infoKey !== key) {
      state.info = await json(`/iiif/${imageId(index)}/info.json`);
      state.infoKey = key;
      state.infoIndex = index;
    }
    const from = `:${state.plane}:${state.infoIndex}`;
    const to = `:${state.plane}:${index}`;
    const id = state.info.id.replace(from, to);
    return Object.assign({}, state.info, { id });
  }

  async function setPlane(plane) {
    state.plane = plane;
    document.querySelectorAll("#planes button").forEach(
      (b) => b.classList.toggle("active", b.dataset.plane === plane));
    const depth = state.stack.planes[plane].depth;
    const slider = $("slice");
    slider.max = String(depth - 1);
    state.index = Math.floor(depth / 2);
    slider.value = String(state.index);
    slider.disabled = depth < 2;
    state.swap += 1;
    viewer.open(await tileSource(state.index));
    setStatus();
  }

  async function showSlice() {
    const token = ++state.swap;
    const source = await tileSource(state.index);
    if (token !== state.swap) return;
    viewer.addTiledImage({
      tileSource: source,
      success: (ev) => {
        const item = ev.item;
        const settle = () => {
          if (token !== state.swap) { viewer.world.removeItem(item); return; }
          for (let i = viewer.world.getItemCount() - 1; i >= 0; i -= 1) {
            const other = viewer.world.getItemAt(i);
            if (other !== item) viewer.world.removeItem(other);
          }
        };
        if (item.getFullyLoaded()) settle();
        else item.addOnceHandler("fully-loaded-change", settle);
      },
    });
    setStatus();
  }

  let pending = false;
  $("slice").addEventListener("input", (e) => {
    state.index = Number(e.target.value);
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; showSlice(); });
  });
  $("window").addEventListener("change", (e) => {
    state.window = e.target.value;
    showSlice();
  });

  // Hooks for the browser test and for debugging from the console.
  window.pacslab = {
    state,
    viewer,
    openStack,
    openStudy,
    setPlane,
    isLoaded() {
      const n = viewer.world.getItemCount();
      if (!n) return false;
      for (let i = 0; i < n; i += 1) if (!viewer.world.getItemAt(i).getFullyLoaded()) return false;
      return true;
    },
  };

  async function openShared() {
    $("search").hidden = true;
    $("pages").hidden = true;
    let share;
    try {
      share = await json("/viewer/api/share");
    } catch (err) {
      $("status").textContent = SIGN_IN;
      $("status").classList.add("error");
      return;
    }
    deepLink = { study: share.study_instance_uid, series: null };
    await openLink();
  }

  (shared ? openShared() : loadStudies()
    .catch((err) => {
      console.error(err);
      $("status").textContent = "Could not load the study list";
    })
    .then(() => (deepLink ? openLink() : null)))
    .catch(report)
    .finally(() => { window.pacslab.ready = true; });
})();
