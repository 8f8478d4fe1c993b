// Reference: Socket.IO 4 broadcast server (WebSocket transport only). Every "msg" event is
// emitted to every client. Usage: node socketio-server.js PORT
const { Server } = require('socket.io');
const port = Number(process.argv[2] || 8083);
const io = new Server({ transports: ['websocket'], perMessageDeflate: false, serveClient: false });
io.on('connection', (socket) => {
  socket.on('msg', (data) => io.emit('msg', data));
});
io.listen(port);
console.log(`socketio listening on ws://127.0.0.1:${port}/socket.io/`);
