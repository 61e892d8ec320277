/* Flywheel console charts: a funnel of horizontal bars and a daily line chart, drawn on
   <canvas> from the numbers the server rendered into data attributes. No dependencies,
   no network: this file is the whole library. */
(function () {
  "use strict";
  var COLORS = ["#2f6fdb", "#3b9c6e", "#c98a1b", "#b6475d", "#7654c2"];

  function setup(canvas) {
    var ratio = window.devicePixelRatio || 1;
    var w = canvas.clientWidth || 600, h = canvas.clientHeight || 240;
    canvas.width = w * ratio;
    canvas.height = h * ratio;
    var ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.font = "13px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    return { ctx: ctx, w: w, h: h };
  }

  function pct(x) { return x === null || x === undefined ? "–" : Math.round(x * 1000) / 10 + "%"; }

  function funnel(canvas) {
    var stages = JSON.parse(canvas.getAttribute("data-funnel"));
    var c = setup(canvas), ctx = c.ctx;
    var top = Math.max(1, Math.max.apply(null, stages.map(function (s) { return s.entered; })));
    var row = c.h / Math.max(1, stages.length), label = 90, bar = c.w - label - 150;
    var summary = [];
    stages.forEach(function (s, i) {
      var width = Math.max(2, bar * s.entered / top), y = i * row + row / 2;
      ctx.fillStyle = COLORS[i % COLORS.length];
      ctx.fillRect(label + (bar - width) / 2, y - row * 0.35, width, row * 0.7);
      ctx.fillStyle = "#222";
      ctx.textAlign = "right";
      ctx.fillText(s.stage, label - 8, y);
      ctx.textAlign = "left";
      var text = s.entered + (i ? "  (" + pct(s.conversion_from_first) + " of first)" : "");
      ctx.fillText(text, label + bar + 8, y);
      summary.push(s.stage + " " + s.entered);
    });
    canvas.setAttribute("aria-label", "funnel: " + summary.join(", "));
    canvas.setAttribute("data-rendered", summary.join(","));
  }

  function series(canvas) {
    var days = JSON.parse(canvas.getAttribute("data-series"));
    var names = JSON.parse(canvas.getAttribute("data-stages"));
    var c = setup(canvas), ctx = c.ctx, pad = 28;
    var top = 1;
    days.forEach(function (d) { names.forEach(function (n) { top = Math.max(top, d[n]); }); });
    var x = function (i) { return pad + (c.w - 2 * pad) * (days.length > 1 ? i / (days.length - 1) : 0.5); };
    var y = function (v) { return c.h - pad - (c.h - 2 * pad) * v / top; };
    ctx.strokeStyle = "#ccc";
    ctx.beginPath(); ctx.moveTo(pad, c.h - pad); ctx.lineTo(c.w - pad, c.h - pad); ctx.stroke();
    names.forEach(function (n, k) {
      ctx.strokeStyle = COLORS[k % COLORS.length];
      ctx.lineWidth = 2;
      ctx.beginPath();
      days.forEach(function (d, i) { (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(i), y(d[n])); });
      ctx.stroke();
      ctx.fillStyle = COLORS[k % COLORS.length];
      ctx.fillText(n, pad + k * 80, 10);
    });
    ctx.fillStyle = "#666";
    ctx.fillText(String(top), 2, pad);
    if (days.length) {
      ctx.fillText(days[0].date, pad, c.h - 10);
      ctx.textAlign = "right";
      ctx.fillText(days[days.length - 1].date, c.w - pad, c.h - 10);
    }
    canvas.setAttribute("data-rendered", String(days.length));
  }

  function draw() {
    Array.prototype.forEach.call(document.querySelectorAll("canvas[data-funnel]"), funnel);
    Array.prototype.forEach.call(document.querySelectorAll("canvas[data-series]"), series);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
