/* The datasource form follows the builder's choices: fields that do not apply to the chosen
   grant type or token placement are hidden. Without JavaScript every field stays visible and the
   server ignores the ones that do not apply. Also: copy buttons. No build step, no framework. */
(function () {
  "use strict";

  // Fields that only mean something for the authorization code grant (a person signs in).
  // The issuer and discovery apply to every grant: they fill the token endpoint, and a signed
  // client assertion may be addressed to the issuer.
  var CODE_GRANT_ONLY = [
    "authorization_url", "use_pkce", "token_sharing", "issuer_returns_iss", "custom_auth_params",
    "pushed_authorization_request_url", "require_pushed_authorization_requests"
  ];
  // The signing key: for private_key_jwt client authentication and the JWT bearer grant.
  var KEY_FIELDS = [
    "private_key", "private_key_file", "generate_private_key", "clear_private_key",
    "private_key_id", "signing_algorithm", "signing_certificate", "public_key", "key_pair"
  ];
  var JWT_BEARER_ONLY = ["service_account_key", "service_account_key_file", "assertion_subject"];

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
    var grant = valueOf("id_grant_type");
    if (grant !== null) {
      var codeGrant = grant === "authorization_code";
      show(CODE_GRANT_ONLY, codeGrant);
      document.querySelectorAll(".datasource-redirect-uri, .datasource-save-authorize")
        .forEach(function (element) { element.hidden = !codeGrant; });
      var method = valueOf("id_client_authentication");
      var jwtBearer = grant === "jwt_bearer";
      show(KEY_FIELDS, jwtBearer || method === "private_key_jwt");
      show(JWT_BEARER_ONLY, jwtBearer);
      show(["assertion_audience"], method === "private_key_jwt" || method === "client_secret_jwt");
      var mtls = method === "tls_client_auth" || method === "self_signed_tls_client_auth";
      // Mutual TLS authenticates with the certificate: its folded section opens, and the
      // client secret, which it does not use, is hidden.
      show(["client_secret", "clear_client_secret"], !mtls);
      if (mtls) {
        rows("tls_client_certificate").forEach(function (row) {
          var section = row.closest("details");
          if (section) { section.open = true; }
        });
      }
    }
    var placement = valueOf("id_token_placement");
    if (placement !== null) {
      show(["header_prefix"], placement === "header");
      show(["query_param_name"], placement === "query");
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
    ["id_grant_type", "id_token_placement", "id_client_authentication"].forEach(function (id) {
      var element = document.getElementById(id);
      if (element) { element.addEventListener("change", update); }
    });
    update();
    copyButtons();
  });
})();
