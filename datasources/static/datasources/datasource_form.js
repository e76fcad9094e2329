/* The datasource form follows the builder's choices: fields that do not apply to the chosen
   grant type or token placement are hidden. Without JavaScript every field stays visible and the
   server ignores the ones that do not apply. Also: copy buttons. No build step, no framework. */
(function () {
  "use strict";

  // When each row is shown, and when a folded group opens by itself: rendered by the page from
  // the settings' groups (datasources/models/groups.py), so no field name is repeated here. A
  // rule is a list of conditions, any of which shows the row; a condition maps a select
  // (grant_type, client_authentication, token_placement) to the values for which it holds.
  function readRules() {
    var element = document.getElementById("datasource-field-rules");
    if (!element) { return { shown: {}, opened: {} }; }
    try { return JSON.parse(element.textContent); } catch (e) { return { shown: {}, opened: {} }; }
  }
  var RULES = { shown: {}, opened: {} };  // read when the page is loaded

  function controls() {
    var names = {};
    [RULES.shown, RULES.opened].forEach(function (rules) {
      Object.keys(rules).forEach(function (field) {
        rules[field].forEach(function (condition) {
          Object.keys(condition).forEach(function (control) { names[control] = true; });
        });
      });
    });
    return Object.keys(names);
  }

  // A select missing from the page (not in this form) never hides anything.
  function holds(rule) {
    return rule.some(function (condition) {
      return Object.keys(condition).every(function (control) {
        var value = valueOf("id_" + control);
        return value === null || condition[control].indexOf(value) !== -1;
      });
    });
  }

  function rows(name) {
    return document.querySelectorAll(".form-row.field-" + name + ", .fieldBox.field-" + name);
  }

  function show(names, visible) {
    names.forEach(function (name) {
      rows(name).forEach(function (row) { row.hidden = !visible; });
    });
  }

  function valueOf(id) {
    var element = document.getElementById(id);
    return element ? element.value : null;
  }

  function update() {
    Object.keys(RULES.shown).forEach(function (name) { show([name], holds(RULES.shown[name])); });
    Object.keys(RULES.opened).forEach(function (name) {
      if (!holds(RULES.opened[name])) { return; }
      rows(name).forEach(function (row) {
        var section = row.closest("details");
        if (section) { section.open = true; }
      });
    });
    var grant = valueOf("id_grant_type");
    if (grant !== null) {
      // The redirect URI and "Save and authorize" concern a person signing in.
      document.querySelectorAll(".datasource-redirect-uri, .datasource-save-authorize")
        .forEach(function (element) { element.hidden = grant !== "authorization_code"; });
    }
  }

  function copyButtons() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.hidden = false;
      button.addEventListener("click", function () {
        var text = button.getAttribute("data-copy");
        var done = function () {
          button.textContent = "Copied";
          button.classList.add("datasource-copied");
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
        } else {
          fallback(text);
          done();
        }
      });
    });
  }

  function fallback(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "absolute";
    area.style.left = "-9999px";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (e) { /* the text stays selectable */ }
    document.body.removeChild(area);
  }

  document.addEventListener("DOMContentLoaded", function () {
    RULES = readRules();
    controls().forEach(function (control) {
      var element = document.getElementById("id_" + control);
      if (element) { element.addEventListener("change", update); }
    });
    update();
    copyButtons();
  });
})();
