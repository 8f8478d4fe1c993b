// Reference: Node `ws` broadcast server. Every text message goes to every client.
// Usage: node ws-server.js PORT
const { WebSocketServer, WebSocket } = require('ws');
const port = Number(process.argv[2] || 8082);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => console.log(`node-ws listening on ws://127.0.0.1:${port}/`));
