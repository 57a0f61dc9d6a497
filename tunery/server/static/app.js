// tunery web console: the little script the pages need (charts, live streams, uploads). No framework, no CDN.
"use strict";
const tunery = (() => {
  const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad", "#f08c00", "#5c940d"];

  // A loss chart: x is the step; one series per name. Returns {set(xs, ys[]), el}
  function chart(el, names, {dashedFrom = null} = {}) {
    const series = [{label: "step"}].concat(names.map((name, i) => ({
      label: name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      dash: dashedFrom !== null && i >= dashedFrom ? [6, 4] : undefined,
      points: {show: (u, si) => u.data[0].length < 80},
    })));
    const size = () => ({width: Math.max(300, el.clientWidth || 600), height: 300});
    const plot = new uPlot({...size(), series, scales: {x: {time: false}},
      axes: [{label: "step"}, {label: "loss"}], legend: {live: true}}, [[], ...names.map(() => [])], el);
    new ResizeObserver(() => plot.setSize(size())).observe(el);
    return {plot, set(xs, ys) { plot.setData([xs, ...ys]); el.dataset.points = String(xs.length); }};
  }

  // The job page: its loss chart and log, fed by the job's server-sent events (only new lines each tick).
  function followJob(chartEl, logEl) {
    const c = chart(chartEl, ["train loss", "held-out loss"], {dashedFrom: 1});
    let steps = [], train = [], held = [];
    chartEl.dataset.points = "0";
    const source = new EventSource(chartEl.dataset.events);
    source.addEventListener("reset", () => { steps = []; train = []; held = []; c.set(steps, [train, held]); });
    source.addEventListener("metrics", (e) => {
      for (const r of JSON.parse(e.data)) {
        const at = steps.length && steps[steps.length - 1] >= r.step ? steps.indexOf(r.step) : -1;
        if (at >= 0) { train[at] = r.loss ?? null; held[at] = r.eval_loss ?? null; continue; }
        steps.push(r.step); train.push(r.loss ?? null); held.push(r.eval_loss ?? null);
      }
      c.set(steps, [train, held]);
    });
    source.addEventListener("log", (e) => {
      const atBottom = logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 40;
      logEl.textContent = (logEl.textContent + JSON.parse(e.data)).slice(-200000);
      if (atBottom) logEl.scrollTop = logEl.scrollHeight;
    });
    source.addEventListener("state", (e) => { chartEl.dataset.state = JSON.parse(e.data).state; });
    source.addEventListener("end", () => { source.close(); chartEl.dataset.ended = "1"; });
    window.addEventListener("pagehide", () => source.close());
  }

  // Static curves (a run's page, compare): runs = [{name, metrics: [{step, loss, eval_loss}]}]
  function curves(el, runs, {held = true} = {}) {
    const steps = [...new Set(runs.flatMap((r) => r.metrics.map((m) => m.step)))].sort((a, b) => a - b);
    const names = [], ys = [];
    for (const r of runs) {
      const byStep = new Map(r.metrics.map((m) => [m.step, m]));
      names.push(runs.length > 1 ? r.name : "train loss");
      ys.push(steps.map((s) => byStep.get(s)?.loss ?? null));
    }
    if (held) for (const r of runs) {
      const byStep = new Map(r.metrics.map((m) => [m.step, m]));
      const values = steps.map((s) => byStep.get(s)?.eval_loss ?? null);
      if (values.some((v) => v !== null)) { names.push((runs.length > 1 ? r.name + " " : "") + "held-out"); ys.push(values); }
    }
    const c = chart(el, names, {dashedFrom: runs.length});
    c.set(steps, ys);
  }

  // Drag-and-drop (or pick) a data file; its report replaces `target`; the stored path goes into `pathInput`.
  function dropzone(zone, fileInput, target, pathInput, url, extra) {
    const send = (file) => {
      const form = new FormData();
      form.append("file", file, file.name);
      for (const [k, v] of new FormData(extra)) if (k !== "file") form.append(k, v);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("HX-Request", "true");
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) zone.dataset.progress = Math.round(100 * e.loaded / e.total) + "%"; target.innerHTML = `<p class="hint">uploading ${file.name}: ${zone.dataset.progress || ""}</p>`; };
      xhr.onload = () => {
        target.innerHTML = xhr.responseText || `<div class="problem">upload failed (${xhr.status})</div>`;
        target.dataset.status = String(xhr.status);
        const stored = xhr.getResponseHeader("X-Tunery-Data");
        if (stored) { pathInput.value = stored; extra.dispatchEvent(new Event("change")); }  // the estimate, not a second report
        htmx.process(target);
      };
      xhr.onerror = () => { target.innerHTML = `<div class="problem">the upload did not reach the console; is it still running?</div>`; };
      target.innerHTML = `<p class="hint">uploading ${file.name}…</p>`;
      xhr.send(form);
    };
    zone.addEventListener("click", () => fileInput.click());
    zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") fileInput.click(); });
    fileInput.addEventListener("change", () => { if (fileInput.files.length) send(fileInput.files[0]); fileInput.value = ""; });
    for (const name of ["dragenter", "dragover"]) zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
    for (const name of ["dragleave", "drop"]) zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("over"); });
    zone.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
  }

  return {chart, followJob, curves, dropzone};
})();
