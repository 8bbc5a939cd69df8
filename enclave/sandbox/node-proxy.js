// Makes Node's `http`, `https` and `fetch` use the egress proxy, unchanged code.
//
// Loaded into every Node process of a sandbox with egress through
// NODE_OPTIONS=--require. Node (before 24) ignores HTTP_PROXY and HTTPS_PROXY,
// and the sandbox has no other way out, so this preload routes connections
// through the proxy named there: every connection opens a CONNECT tunnel to
// the destination, then TLS runs inside it end to end as it would directly.
//
// - http and https: every Agent's createConnection (the global agents and any
//   the code makes) opens the tunnel first.
// - fetch: Node's bundled undici creates its global dispatcher when first
//   loaded; it is replaced with one of the same class whose connector opens
//   the tunnel.
//
// Hosts in NO_PROXY (the sandbox's own loopback) are reached directly. A
// refusal by the proxy surfaces as the request's error, with the proxy's
// status and reason in its message.
'use strict';

(function installEgressProxy() {
  const env = process.env;
  const proxyText = env.HTTPS_PROXY || env.https_proxy || env.HTTP_PROXY || env.http_proxy;
  if (!proxyText) {
    return;
  }

  const net = require('net');
  const tls = require('tls');
  const http = require('http');
  const https = require('https');

  let proxy;
  try {
    proxy = new URL(proxyText);
  } catch (error) {
    return;
  }
  const proxyHost = proxy.hostname.replace(/^\[|\]$/g, '');
  const proxyPort = Number(proxy.port) || 80;
  const credentials = proxy.username
    ? Buffer.from(
        `${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`,
      ).toString('base64')
    : null;

  const bypassed = (env.NO_PROXY || env.no_proxy || '')
    .split(',')
    .map((entry) => entry.trim().toLowerCase().replace(/^\[|\]$/g, ''))
    .filter(Boolean);

  function bypasses(host) {
    const name = String(host || '').toLowerCase().replace(/^\[|\]$/g, '');
    return bypassed.some((entry) => {
      if (entry === '*') {
        return true;
      }
      const suffix = entry.startsWith('.') ? entry : `.${entry}`;
      return name === entry.replace(/^\./, '') || name.endsWith(suffix);
    });
  }

  function authority(host, port) {
    const name = String(host).replace(/^\[|\]$/g, '');
    return `${name.includes(':') ? `[${name}]` : name}:${port}`;
  }

  // Opens a tunnel to host:port; callback(error, socket) once it is ready.
  function tunnel(host, port, callback) {
    const target = authority(host, port);
    const socket = net.connect(proxyPort, proxyHost);
    let received = Buffer.alloc(0);
    let settled = false;

    function finish(error, result) {
      if (settled) {
        return;
      }
      settled = true;
      socket.removeListener('data', onData);
      socket.removeListener('error', onError);
      socket.removeListener('end', onEnd);
      if (error) {
        socket.destroy();
      }
      callback(error, result);
    }

    function onData(chunk) {
      received = Buffer.concat([received, chunk]);
      const end = received.indexOf('\r\n\r\n');
      if (end < 0) {
        if (received.length > 64 * 1024) {
          finish(new Error('egress proxy: oversized answer to CONNECT'));
        }
        return;
      }
      const head = received.subarray(0, end).toString('latin1').split('\r\n');
      const status = Number((head[0].split(' ')[1]) || 0);
      if (status !== 200) {
        const reason = head
          .slice(1)
          .find((line) => line.toLowerCase().startsWith('x-enclave-egress-reason:'));
        const error = new Error(
          `egress proxy refused ${target}: ${head[0]}` +
            (reason ? ` (${reason.split(':').slice(1).join(':').trim()})` : ''),
        );
        error.code = 'EGRESS_REFUSED';
        error.statusCode = status;
        finish(error);
        return;
      }
      // Nothing follows a 200 until the client speaks first (a ClientHello or
      // a request), so no data can be lost between here and its reader.
      finish(null, socket);
    }

    function onError(error) {
      finish(error);
    }

    function onEnd() {
      finish(new Error(`egress proxy closed the tunnel to ${target}`));
    }

    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.once('connect', () => {
      const lines = [`CONNECT ${target} HTTP/1.1`, `Host: ${target}`];
      if (credentials) {
        lines.push(`Proxy-Authorization: Basic ${credentials}`);
      }
      socket.write(`${lines.join('\r\n')}\r\n\r\n`);
    });
  }

  // -- http and https -------------------------------------------------------

  const plainCreate = http.Agent.prototype.createConnection;
  const secureCreate = https.Agent.prototype.createConnection;

  http.Agent.prototype.createConnection = function createConnection(options, oncreate) {
    if (!options || typeof options !== 'object' || typeof oncreate !== 'function' ||
        bypasses(options.host)) {
      return plainCreate.apply(this, arguments);
    }
    tunnel(options.host || 'localhost', options.port || 80, oncreate);
    return undefined;
  };

  https.Agent.prototype.createConnection = function createConnection(options, oncreate) {
    if (!options || typeof options !== 'object' || typeof oncreate !== 'function' ||
        bypasses(options.host)) {
      return secureCreate.apply(this, arguments);
    }
    const host = options.host || 'localhost';
    tunnel(host, options.port || 443, (error, raw) => {
      if (error) {
        oncreate(error);
        return;
      }
      const secure = tls.connect({
        ...options,
        socket: raw,
        servername: options.servername || (net.isIP(host) ? undefined : host),
      });
      oncreate(null, secure);
    });
    return undefined;
  };

  // -- fetch ----------------------------------------------------------------

  const dispatcherKey = Symbol.for('undici.globalDispatcher.1');
  try {
    // Touching a lazily exposed undici class loads undici, which installs
    // its default dispatcher; its class is the one to build ours from.
    void globalThis.Headers;
    const current = globalThis[dispatcherKey];
    if (current && typeof current.constructor === 'function') {
      const Dispatcher = current.constructor;
      globalThis[dispatcherKey] = new Dispatcher({ connect: connectForFetch });
    }
  } catch (error) {
    // Without a replacement, fetch has no way out at all: fail closed.
  }

  function connectForFetch(options, callback) {
    const secure = options.protocol === 'https:';
    const host = options.hostname;
    const port = Number(options.port) || (secure ? 443 : 80);
    const servername = options.servername || (net.isIP(host) ? undefined : host);
    const done = (error, socket) => {
      if (error) {
        callback(error, null);
        return;
      }
      if (!secure) {
        callback(null, socket);
        return;
      }
      const wrapped = tls.connect({ socket, servername, ALPNProtocols: ['http/1.1'] });
      const onError = (failure) => callback(failure, null);
      wrapped.once('error', onError);
      wrapped.once('secureConnect', () => {
        wrapped.removeListener('error', onError);
        callback(null, wrapped);
      });
    };
    if (bypasses(host)) {
      const socket = secure
        ? tls.connect({ host, port, servername, ALPNProtocols: ['http/1.1'] })
        : net.connect(port, host);
      const ready = secure ? 'secureConnect' : 'connect';
      const onError = (failure) => callback(failure, null);
      socket.once('error', onError);
      socket.once(ready, () => {
        socket.removeListener('error', onError);
        callback(null, socket);
      });
      return;
    }
    tunnel(host, port, done);
  }
})();
