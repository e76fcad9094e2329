// DPoP (RFC 9449 §7) at the harness's resource server (/_test/resource), for tokens that
// oidc-provider's userinfo endpoint cannot take (client credentials): the proof verified with
// its embedded key (jose), htm/htu/ath/iat checked, each proof accepted once, the key's
// thumbprint compared with the token's cnf.jkt, and, when configured, a nonce of its own
// required (use_dpop_nonce + DPoP-Nonce, RFC 9449 §9). Errors as RFC 9449 §7.1 says:
// invalid_dpop_proof for the proof, invalid_token for the token, use_dpop_nonce for a nonce.
import * as crypto from 'node:crypto';

import * as jose from 'jose';

const seen = new Set();
let nonce = crypto.randomBytes(16).toString('base64url');

export function rotateResourceNonce() {
  nonce = crypto.randomBytes(16).toString('base64url');
}

function refuse(ctx, error, description, withNonce = false) {
  ctx.status = 401;
  ctx.set('WWW-Authenticate', `DPoP error="${error}", error_description="${description}", algs="ES256 PS256 RS256"`);
  if (withNonce) ctx.set('DPoP-Nonce', nonce);
  ctx.body = { error, error_description: description };
  return false;
}

// true when the DPoP-bound ``token`` (value ``value``) may be used for this request; otherwise
// the 401 is set on ctx and false returned.
export async function checkDpop(ctx, token, value, { issuer, requireNonce }) {
  const proof = ctx.get('dpop');
  if (!/^DPoP /i.test(ctx.get('authorization') || '')) {
    return refuse(ctx, 'invalid_token', 'DPoP-bound token sent with another scheme');
  }
  if (!proof) return refuse(ctx, 'invalid_dpop_proof', 'DPoP proof missing');
  let verified;
  try {
    verified = await jose.jwtVerify(proof, jose.EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256', 'PS256', 'RS256'] });
  } catch (err) {
    return refuse(ctx, 'invalid_dpop_proof', `proof signature: ${err.code || err.message}`);
  }
  const { payload, protectedHeader } = verified;
  const htu = `${issuer}${ctx.path}`;
  if (payload.htm !== ctx.method) return refuse(ctx, 'invalid_dpop_proof', 'htm mismatch');
  if (payload.htu !== htu) return refuse(ctx, 'invalid_dpop_proof', 'htu mismatch');
  const ath = crypto.createHash('sha256').update(value).digest('base64url');
  if (payload.ath !== ath) return refuse(ctx, 'invalid_dpop_proof', 'ath mismatch');
  if (typeof payload.jti !== 'string' || Math.abs(Date.now() / 1000 - payload.iat) > 60) {
    return refuse(ctx, 'invalid_dpop_proof', 'jti or iat missing or out of window');
  }
  if (requireNonce && payload.nonce !== nonce) {
    return refuse(ctx, 'use_dpop_nonce', 'resource server requires a nonce', true);
  }
  if (seen.has(payload.jti)) return refuse(ctx, 'invalid_dpop_proof', 'proof replayed');
  seen.add(payload.jti);
  const thumbprint = await jose.calculateJwkThumbprint(protectedHeader.jwk);
  if (thumbprint !== token.jkt) return refuse(ctx, 'invalid_token', 'failed jkt verification');
  return true;
}
