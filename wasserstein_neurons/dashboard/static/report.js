// wasserstein_neurons neuron dashboard, index page: sort / filter the neuron table and jump to
// a neuron page from a "layer:neuron" search. No network, no dependencies.
(function () {
  "use strict";
  var table = document.getElementById("neurons");
  if (!table) return;
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var heads = table.tHead.rows[0].cells;
  var pages = JSON.parse(document.getElementById("pages").textContent);
  var layerSel = document.getElementById("layer-filter");
  var minWd = document.getElementById("wd-min");
  var shown = document.getElementById("shown");

  function value(row, col) {
    var v = row.cells[col].getAttribute("data-v");
    var n = parseFloat(v);
    return isNaN(n) ? v : n;
  }

  function sortBy(col) {
    var th = heads[col];
    var asc = !th.classList.contains("asc");
    for (var i = 0; i < heads.length; i++) heads[i].classList.remove("asc", "desc");
    th.classList.add(asc ? "asc" : "desc");
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      if (x === y) return 0;
      return (x < y ? -1 : 1) * (asc ? 1 : -1);
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function applyFilter() {
    var layer = layerSel.value, wd = parseFloat(minWd.value), n = 0;
    rows.forEach(function (r) {
      var ok = (layer === "" || r.getAttribute("data-layer") === layer) &&
        (isNaN(wd) || parseFloat(r.getAttribute("data-wd")) >= wd);
      r.style.display = ok ? "" : "none";
      if (ok) n++;
    });
    shown.textContent = n + " of " + rows.length + " neurons shown";
  }

  function search(ev) {
    ev.preventDefault();
    var text = document.getElementById("search").value.trim();
    var m = /^(\d+)\s*[:_ ,]\s*(\d+)$/.exec(text);
    var msg = document.getElementById("search-msg");
    if (!m) { msg.textContent = "type layer:neuron, e.g. 5:123"; return; }
    var id = String(parseInt(m[1], 10)) + "_" + String(parseInt(m[2], 10));
    if (pages[id]) { window.location.href = pages[id]; return; }
    msg.textContent = "no page for " + m[1] + ":" + m[2] +
      " (pages exist for the Wasserstein neurons and the neurons asked for with --neurons)";
  }

  for (var i = 0; i < heads.length; i++) {
    heads[i].addEventListener("click", sortBy.bind(null, i));
  }
  layerSel.addEventListener("change", applyFilter);
  minWd.addEventListener("input", applyFilter);
  document.getElementById("search-form").addEventListener("submit", search);
  applyFilter();
})();
