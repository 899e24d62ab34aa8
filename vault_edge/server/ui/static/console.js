// vault-edge console: live updates over server-sent events. No dependency, no inline script (the
// Content-Security-Policy allows only this file); the DOM is built with textContent, never HTML.
"use strict";

(function () {
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderGrid(grid, doc) {
    var regions = [];
    doc.regions.forEach(function (r) {
      var box = el("div", "region");
      box.setAttribute("data-region", r.name);
      box.appendChild(el("h3", "", r.name));
      var pops = el("div", "pops");
      if (!r.nodes.length) pops.appendChild(el("p", "muted", "no node"));
      r.nodes.forEach(function (n) {
        var pop = el("div", "pop " + n.state);
        pop.setAttribute("data-node", n.id);
        pop.appendChild(el("span", "pop-id", n.id));
        pop.appendChild(el("span", "pop-version", n.serving ? "v" + n.serving : "\u2013"));
        pop.appendChild(el("span", "pop-state", n.state));
        pops.appendChild(pop);
      });
      box.appendChild(pops);
      regions.push(box);
    });
    grid.replaceChildren.apply(grid, regions);
  }

  function live(section) {
    var url = section.getAttribute("data-events");
    var grid = section.querySelector("#grid");
    var summary = section.querySelector("#summary");
    var dot = section.querySelector("#live-dot");
    var source = new EventSource(url);
    source.addEventListener("open", function () { if (dot) dot.className = "live-dot on"; });
    source.addEventListener("error", function () { if (dot) dot.className = "live-dot"; });
    source.addEventListener("rotation", function (ev) {
      var doc;
      try { doc = JSON.parse(ev.data); } catch (e) { return; }
      summary.textContent = doc.summary;
      summary.className = "summary " + (doc.complete ? "complete" : "pending");
      renderGrid(grid, doc);
      section.setAttribute("data-revision", String(doc.revision));
    });
    source.addEventListener("end", function () {  // signed out, revoked, sealed or deleted
      source.close();
      if (dot) dot.className = "live-dot";
      summary.textContent = "live view ended: reload the page (or sign in again)";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-events]").forEach(live);
  });
})();
