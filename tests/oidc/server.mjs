// panva's oidc-provider as a real authorization server for the test suite (tests/oidcprovider.py).
//
// Usage: node server.mjs CONFIG.json   (prints "ISSUER <url>" on stdout once listening on 127.0.0.1:0)
//
// CONFIG (every key optional):
//   clients          oidc-provider client metadata (token_endpoint_auth_method, jwks / jwks_uri,
//                    grant_types, redirect_uris, tls_client_auth_*, dpop_bound_access_tokens, ...)
//   features         { dpop: {enabled, requireNonce, resourceNonce}, mTLS: {enabled, certificateBoundAccessTokens,
//                    tlsClientAuth, selfSignedTlsClientAuth}, par: {enabled, require},
//                    revocation: bool, introspection: bool }
//   ttl              seconds per token kind: { AccessToken, ClientCredentials, RefreshToken }
//   rotateRefreshToken  bool (default true: every refresh rotates the refresh token)
//   jwtBearer        { issuers: { <iss>: { client_id, jwks } }, maxLifetime: seconds }
//                    registers urn:ietf:params:oauth:grant-type:jwt-bearer (RFC 7523 §2.1); an
//                    issuer without an entry is looked up as a client with that client_id and its jwks.
//   tls              { key, cert, ca } file paths: serve https with requestCert (mTLS); the peer
//                    certificate comes from the socket.
//   account          { sub, email, name } of the test user the interaction logs in.
//   clientAuthMethods  the token endpoint's client authentication methods (default: all but
//                    the mTLS ones, which follow features.mTLS).
//
// Test-only routes (not part of any spec):
//   GET  /_test/log       every request to token/par/revocation/introspection/userinfo/resource with
//                         the grant type, client-auth method used, DPoP presence and the outcome, plus
//                         counters derived from it
//   POST /_test/reset     clears the log
//   POST /_test/account/<sub>  the account the next logins sign in (a person with another account)
//   ANY  /_test/resource  a resource server: 200 with the token's subject/client/scope for a valid
//                         bearer token (authorization code, client credentials or JWT bearer),
//                         certificate-bound tokens checked against the TLS peer certificate,
//                         DPoP-bound ones by dpop_resource.mjs (features.dpop.resourceNonce: its
//                         own nonce required);
//                         401 with WWW-Authenticate otherwise.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as querystring from 'node:querystring';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

// oidc-provider's own DPoP helpers, for the JWT bearer grant registered below.
import { applyDpopBinding } from 'oidc-provider/lib/helpers/grant_common.js';
import validateDpop from 'oidc-provider/lib/helpers/validate_dpop.js';

import { checkDpop } from './dpop_resource.mjs';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const features = config.features || {};
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const account = { sub: 'test-user', email: 'test-user@example.com', name: 'Test User', ...config.account };

const log = [];
const seenAssertionIds = new Set();

const server = config.tls
  ? https.createServer({
    key: fs.readFileSync(config.tls.key),
    cert: fs.readFileSync(config.tls.cert),
    ca: config.tls.ca ? fs.readFileSync(config.tls.ca) : undefined,
    requestCert: true,
    rejectUnauthorized: false, // the provider decides per client (tls_client_auth vs self-signed)
  })
  : http.createServer();

await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const { port } = server.address();
const issuer = `${config.tls ? 'https' : 'http'}://127.0.0.1:${port}`;

function peerCertificate(ctx) {
  const socket = ctx.req.socket;
  if (typeof socket.getPeerX509Certificate !== 'function') return undefined;
  return socket.getPeerX509Certificate() || undefined;
}

// RFC 4514-ish comparison: Node renders "CN=a\nO=b"; registrations say "CN=a,O=b".
function normalizeDn(dn) {
  return dn.split(/[\n,]/).map((part) => part.trim()).filter(Boolean).sort().join(',');
}

const ttl = config.ttl || {};
const providerConfig = {
  clients: config.clients || [],
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  jwks: { keys: [(await jose.exportJWK((await jose.generateKeyPair('RS256', { extractable: true })).privateKey))] },
  pkce: { required: () => false },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'api'],
  claims: { openid: ['sub'], email: ['email'], profile: ['name'] },
  clientAuthMethods: config.clientAuthMethods || [
    'none', 'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
    ...(features.mTLS?.tlsClientAuth ? ['tls_client_auth'] : []),
    ...(features.mTLS?.selfSignedTlsClientAuth ? ['self_signed_tls_client_auth'] : []),
  ],
  enabledJWA: {
    clientAuthSigningAlgValues: ['HS256', 'RS256', 'PS256', 'ES256', 'EdDSA'],
    dPoPSigningAlgValues: ['ES256', 'RS256', 'PS256', 'EdDSA'],
  },
  ttl: {
    AccessToken: ttl.AccessToken || 3600,
    ClientCredentials: ttl.ClientCredentials || 3600,
    RefreshToken: ttl.RefreshToken || 14 * 24 * 3600,
    AuthorizationCode: 60,
    Grant: 14 * 24 * 3600,
    Interaction: 3600,
    Session: 3600,
    PushedAuthorizationRequest: 60,
  },
  rotateRefreshToken: () => config.rotateRefreshToken !== false,
  // Offline access without the openid prompt=consent dance: a refresh token for every code grant
  // whose client may refresh.
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ ...account, sub: id }),
  }),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    revocation: { enabled: features.revocation !== false },
    introspection: { enabled: features.introspection !== false },
    userinfo: { enabled: true },
    dPoP: {
      enabled: Boolean(features.dpop?.enabled),
      requireNonce: () => Boolean(features.dpop?.requireNonce),
      nonceSecret: features.dpop?.requireNonce ? crypto.randomBytes(32) : undefined,
    },
    pushedAuthorizationRequests: {
      enabled: features.par?.enabled !== false,
      requirePushedAuthorizationRequests: Boolean(features.par?.require),
    },
    mTLS: {
      enabled: Boolean(features.mTLS?.enabled),
      certificateBoundAccessTokens: Boolean(features.mTLS?.certificateBoundAccessTokens),
      tlsClientAuth: Boolean(features.mTLS?.tlsClientAuth),
      selfSignedTlsClientAuth: Boolean(features.mTLS?.selfSignedTlsClientAuth),
      getCertificate: peerCertificate,
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches(ctx, property, expected) {
        const cert = peerCertificate(ctx);
        if (!cert) return false;
        switch (property) {
          case 'tls_client_auth_subject_dn':
            return normalizeDn(cert.subject) === normalizeDn(expected);
          case 'tls_client_auth_san_dns':
            return (cert.subjectAltName || '').split(', ').includes(`DNS:${expected}`);
          default:
            throw new Error(`unsupported ${property}`);
        }
      },
    },
  },
};

const provider = new Provider(issuer, providerConfig);
provider.proxy = false;

// --- the JWT bearer grant (RFC 7523 §2.1) ------------------------------------------------------
// invalid_grant with the reason as error_description (oidc-provider keeps details private).
function grantError(reason) {
  const error = new errors.InvalidGrant(reason);
  error.error_description = reason;
  return error;
}

async function assertionKeys(iss) {
  const entry = config.jwtBearer?.issuers?.[iss];
  if (entry?.jwks) return { clientId: entry.client_id || iss, keys: jose.createLocalJWKSet(entry.jwks) };
  const client = (config.clients || []).find((c) => c.client_id === (entry?.client_id || iss));
  if (client?.jwks) return { clientId: client.client_id, keys: jose.createLocalJWKSet(client.jwks) };
  if (client?.jwks_uri) return { clientId: client.client_id, keys: jose.createRemoteJWKSet(new URL(client.jwks_uri)) };
  return undefined;
}

if (config.jwtBearer) {
  const maxLifetime = config.jwtBearer.maxLifetime || 3600;
  provider.registerGrantType(JWT_BEARER, async (ctx) => {
    const { assertion, scope } = ctx.oidc.params;
    const dPoP = await validateDpop(provider, ctx); // RFC 9449 for this grant too (nonce included)
    if (!assertion) throw new errors.InvalidRequest('missing assertion');
    let claims;
    try {
      claims = jose.decodeJwt(assertion);
    } catch {
      throw grantError('assertion is not a JWT');
    }
    const found = claims.iss ? await assertionKeys(claims.iss) : undefined;
    if (!found || found.clientId !== ctx.oidc.client.clientId) {
      throw grantError('unknown assertion issuer');
    }
    try {
      await jose.jwtVerify(assertion, found.keys, {
        issuer: claims.iss,
        audience: [`${issuer}/token`, issuer],
        requiredClaims: ['exp', 'iat', 'jti'],
        maxTokenAge: maxLifetime,
      });
    } catch (err) {
      throw grantError(`assertion rejected: ${err.code || err.message}`);
    }
    if (seenAssertionIds.has(claims.jti)) throw grantError('assertion replayed (jti already used)');
    seenAssertionIds.add(claims.jti);

    const accountId = claims.sub || claims.iss;
    const { client } = ctx.oidc;
    const requested = (scope || 'openid').split(' ').filter(Boolean);
    const allowed = new Set((client.scope || 'openid offline_access profile email api').split(' '));
    const scopes = requested.filter((s) => allowed.has(s) && s !== 'offline_access');
    if (!scopes.includes('openid')) scopes.unshift('openid');

    const grant = new provider.Grant({ accountId, clientId: client.clientId });
    grant.addOIDCScope(scopes.join(' '));
    const grantId = await grant.save();
    const token = new provider.AccessToken({
      accountId, client, grantId, gty: JWT_BEARER, scope: scopes.join(' '),
    });
    if (client.tlsClientCertificateBoundAccessTokens) {
      const cert = peerCertificate(ctx);
      if (!cert) throw grantError('mutual TLS client certificate not provided');
      token.setThumbprint('x5t', cert);
    }
    await applyDpopBinding(provider, ctx, dPoP, token);
    const value = await token.save();
    ctx.body = {
      access_token: value, token_type: token.tokenType, expires_in: token.expiration, scope: token.scope,
    };
  }, ['assertion', 'scope']);
}

// --- interaction: log the test user in and consent to everything asked ---------------------------
async function interaction(ctx) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { prompt, params, session } = details;
  let result;
  if (prompt.name === 'login') {
    result = { login: { accountId: account.sub } };
  } else {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  }
  await provider.interactionFinished(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
  ctx.respond = false;
}

// --- the resource server --------------------------------------------------------------------------
async function resource(ctx) {
  const header = ctx.get('authorization');
  const match = /^(Bearer|DPoP) (.+)$/i.exec(header || '');
  const deny = (description) => {
    ctx.status = 401;
    ctx.set('WWW-Authenticate', `Bearer error="invalid_token", error_description="${description}"`);
    ctx.body = { error: 'invalid_token', error_description: description };
  };
  if (!match) return deny('no access token');
  const value = match[2];
  const token = (await provider.AccessToken.find(value)) || (await provider.ClientCredentials.find(value));
  if (!token || token.isExpired) return deny('access token not found or expired');
  if (token['x5t#S256']) {
    const cert = peerCertificate(ctx);
    const thumbprint = cert && crypto.createHash('sha256').update(cert.raw).digest('base64url');
    if (thumbprint !== token['x5t#S256']) return deny('failed x5t#S256 verification');
  }
  if (token.jkt && !(await checkDpop(ctx, token, value, { issuer, requireNonce: features.dpop?.resourceNonce }))) return undefined;
  ctx.body = {
    sub: token.accountId, client_id: token.clientId, scope: token.scope, path: ctx.path, method: ctx.method,
  };
}

// --- the request log behind the counters ---------------------------------------------------------
const LOGGED = new Map([
  ['/token', 'token'], ['/request', 'par'], ['/token/revocation', 'revocation'],
  ['/token/introspection', 'introspection'], ['/me', 'userinfo'],
]);

function clientAuthMethod(ctx, body) {
  const authorization = ctx.get('authorization');
  if (/^basic /i.test(authorization) && ctx.path !== '/me') return 'client_secret_basic';
  if (body.client_assertion_type) {
    try {
      const { alg } = jose.decodeProtectedHeader(body.client_assertion);
      return alg.startsWith('HS') ? 'client_secret_jwt' : 'private_key_jwt';
    } catch {
      return 'malformed_client_assertion';
    }
  }
  if (body.client_secret) return 'client_secret_post';
  if (peerCertificate(ctx)) {
    const registered = (config.clients || []).find((c) => c.client_id === body.client_id);
    return registered?.token_endpoint_auth_method === 'self_signed_tls_client_auth'
      ? 'self_signed_tls_client_auth' : 'tls_client_auth';
  }
  return 'none';
}

provider.use(async (ctx, next) => {
  if (ctx.path === '/_test/log') {
    const counters = { token: {}, par: 0, revocation: 0, introspection: 0, userinfo: 0, resource: 0 };
    const dpop = { seen: 0, refused: 0 };
    for (const entry of log) {
      if (entry.endpoint === 'token' && entry.status === 200) {
        counters.token[entry.grant_type] = (counters.token[entry.grant_type] || 0) + 1;
      } else if (entry.endpoint !== 'token' && entry.status < 300) {
        counters[entry.endpoint] += 1;
      }
      if (entry.dpop) dpop.seen += 1;
      if (entry.dpop && ['invalid_dpop_proof', 'use_dpop_nonce'].includes(entry.error)) dpop.refused += 1;
    }
    const lastAuth = [...log].reverse().find((e) => e.client_auth && e.endpoint !== 'userinfo');
    ctx.body = { requests: log, counters, dpop, last_client_auth: lastAuth?.client_auth || null };
    return undefined;
  }
  if (ctx.path === '/_test/reset' && ctx.method === 'POST') {
    log.length = 0;
    ctx.status = 204;
    return undefined;
  }
  if (ctx.path.startsWith('/_test/account/') && ctx.method === 'POST') {
    account.sub = decodeURIComponent(ctx.path.slice('/_test/account/'.length));
    ctx.status = 204;
    return undefined;
  }
  if (ctx.path.startsWith('/interaction/')) return interaction(ctx);

  const endpoint = ctx.path.startsWith('/_test/resource') ? 'resource' : LOGGED.get(ctx.path);
  if (!endpoint) return next();

  // Parse the form body here so it can be logged; oidc-provider then uses the parsed body.
  let body = {};
  if (ctx.method === 'POST' && ctx.is('application/x-www-form-urlencoded')) {
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    body = querystring.parse(Buffer.concat(chunks).toString());
    ctx.request.body = body;
    // A JWT bearer request with no client authentication (Google, Salesforce): the assertion's
    // issuer names the client, which oidc-provider needs as client_id with auth method "none".
    if (body.grant_type === JWT_BEARER && clientAuthMethod(ctx, body) === 'none' && !body.client_id) {
      try {
        body.client_id = jose.decodeJwt(body.assertion).iss;
      } catch { /* the grant handler answers invalid_grant */ }
    }
  }
  const entry = {
    endpoint,
    method: ctx.method,
    grant_type: body.grant_type,
    client_auth: endpoint === 'resource' || endpoint === 'userinfo' ? undefined : clientAuthMethod(ctx, body),
    client_assertion: body.client_assertion,
    assertion: body.assertion,
    request_uri: ctx.query.request_uri,
    dpop: Boolean(ctx.get('dpop')),
    authorization_scheme: (ctx.get('authorization') || '').split(' ')[0] || undefined,
  };
  if (endpoint === 'resource') {
    await resource(ctx);
  } else {
    await next();
  }
  entry.status = ctx.status;
  if (ctx.status >= 400 && ctx.body && typeof ctx.body === 'object') {
    entry.error = ctx.body.error;
    entry.error_description = ctx.body.error_description;
  } else if (ctx.status >= 400) {
    const challenge = ctx.response.get('www-authenticate');
    entry.error = /error="([^"]+)"/.exec(challenge || '')?.[1];
  }
  log.push(entry);
  return undefined;
});

server.on('request', provider.callback());
process.stdout.write(`ISSUER ${issuer}\n`);
process.on('SIGTERM', () => { server.close(); process.exit(0); });
