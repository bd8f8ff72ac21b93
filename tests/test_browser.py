"""The chat page in a real headless Chromium, driven by Selenium through chromedriver.

Uses the system's Chromium and chromedriver (Debian: ``apt-get install chromium
chromium-driver``) and installs nothing; skipped, saying so, where either is missing.
Selenium is blocking, so its calls run in a worker thread while the server runs in the
test's trio loop. The desktop and phone screenshots README shows are taken here.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

from tests.chatclient import Client, free_port
from tests.conftest import TLSFiles
from trio_chat.config import Config
from trio_chat.server import ChatServer

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
CHROMEDRIVER = shutil.which("chromedriver")
_missing = [
    name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path
]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"needs Chromium and its driver, not found: {', '.join(_missing)} "
    "(Debian: apt-get install chromium chromium-driver)",
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT = 15.0  # seconds a page may take to show what it should; only reached when it is wrong
T = TypeVar("T")


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking Selenium call without blocking the server's trio loop."""
    return await trio.to_thread.run_sync(functools.partial(function, *args))


def open_browser() -> webdriver.Chrome:
    """A headless Chromium through the system's chromedriver (Selenium Manager not used)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.accept_insecure_certs = True  # the HTTPS test's certificate is from a test CA
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1000,640",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the test."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, if asked, downloads nothing
    driver = open_browser()
    try:
        yield driver
    finally:
        driver.quit()


def log_lines(driver: webdriver.Chrome) -> list[str]:
    """The lines of the current room's log, as the user reads them."""
    text: str = driver.find_element(By.ID, "log").text
    return text.splitlines()


def wait_for_line(driver: webdriver.Chrome, line: str) -> None:
    """Wait until `line` is in the page's log."""
    WebDriverWait(driver, WAIT).until(lambda d: line in log_lines(d))


def room_tabs(driver: webdriver.Chrome) -> list[str]:
    """The names of the rooms listed, in order."""
    tabs = driver.find_elements(By.CSS_SELECTOR, "#rooms .tab")
    return [tab.text.splitlines()[0] for tab in tabs]


def wait_for_status(driver: webdriver.Chrome, status: str) -> None:
    """Wait until the connection status reads exactly `status`."""
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "status").text == status)


def wait_for_text(driver: webdriver.Chrome, element_id: str, text: str) -> None:
    """Wait until the element's text contains `text`."""
    WebDriverWait(driver, WAIT).until(lambda d: text in d.find_element(By.ID, element_id).text)


def type_message(driver: webdriver.Chrome, text: str) -> None:
    """Type `text` into #message and press Enter."""
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "message").is_enabled())
    driver.find_element(By.ID, "message").send_keys(text + Keys.ENTER)


def screenshot(driver: webdriver.Chrome, path: Path, width: int, height: int) -> None:
    """Save the window at `width` x `height` with nothing focused (no blinking caret), so that
    the same page gives the same picture."""
    driver.set_window_size(width, height)
    driver.execute_script("document.activeElement.blur()")
    png = driver.get_screenshot_as_png()
    if not path.exists() or path.read_bytes() != png:
        path.write_bytes(png)


Servers = Callable[..., Awaitable[tuple[ChatServer, int]]]
"""The type of the `servers` fixture: ``await servers(web_port, **settings)``."""


@pytest.fixture
def servers(nursery: trio.Nursery) -> Servers:
    """A function starting a server with its web door on 127.0.0.1 and `web_port`; it
    returns the server and its TCP port."""

    async def start(web_port: int, **settings: Any) -> tuple[ChatServer, int]:
        config = Config(host="127.0.0.1", port=0, web_port=web_port, **settings)
        server = ChatServer(config)
        listeners = await nursery.start(server.serve)
        return server, listeners[0].socket.getsockname()[1]

    return start


async def test_two_browsers_and_a_tcp_client_chat_in_one_room(
    browser: webdriver.Chrome, servers: Servers
) -> None:
    """Two pages opened from shareable links and a TCP client in one room each see every
    message, join announcements included, in the one order the server broadcast them."""
    web_port = free_port()
    _, tcp_port = await servers(web_port)
    tom = await Client.connect(tcp_port)
    await tom.send("JOIN_CHATROOM: lobby\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: tom\n")
    await tom.receive_until(b"tom has joined this chatroom.\n\n")

    ann = browser.current_window_handle
    await in_thread(browser.get, f"http://127.0.0.1:{web_port}/?name=ann&room=lobby")
    await in_thread(wait_for_line, browser, "ann: ann has joined this chatroom.")
    await tom.receive_until(b"ann has joined this chatroom.\n\n")
    await in_thread(browser.switch_to.new_window, "window")
    bob = browser.current_window_handle
    await in_thread(browser.get, f"http://127.0.0.1:{web_port}/?name=bob&room=lobby")
    await in_thread(wait_for_line, browser, "bob: bob has joined this chatroom.")
    await tom.receive_until(b"bob has joined this chatroom.\n\n")

    expected = ["ann: ann has joined this chatroom.", "bob: bob has joined this chatroom."]
    for turn in range(2):
        # Each message reaches tom before the next is sent: the server's order is this one.
        await in_thread(browser.switch_to.window, ann)
        await in_thread(type_message, browser, f"hello from ann ({turn})")
        await tom.receive_until(f"MESSAGE: hello from ann ({turn})\n\n".encode())
        await in_thread(browser.switch_to.window, bob)
        await in_thread(type_message, browser, f"hi from bob ({turn})")
        await tom.receive_until(f"MESSAGE: hi from bob ({turn})\n\n".encode())
        await tom.send(f"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: tom\nMESSAGE: hey from tom ({turn})\n\n")
        await tom.receive_until(f"MESSAGE: hey from tom ({turn})\n\n".encode())
        expected += [f"ann: hello from ann ({turn})", f"bob: hi from bob ({turn})"]
        expected += [f"tom: hey from tom ({turn})"]

    for window, joined_before in ((ann, expected[0]), (bob, expected[1])):
        await in_thread(browser.switch_to.window, window)
        await in_thread(wait_for_line, browser, expected[-1])
        lines = await in_thread(log_lines, browser)
        assert lines == expected[expected.index(joined_before) :]

    await tom.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: tom\n")
    await in_thread(wait_for_line, browser, "tom: tom has left this chatroom.")
    await in_thread(screenshot, browser, DOCS / "browser.png", 1000, 640)
    await in_thread(screenshot, browser, DOCS / "browser-phone.png", 390, 700)
    await tom.stream.aclose()


async def test_rooms_errors_and_a_server_restart(
    browser: webdriver.Chrome, servers: Servers
) -> None:
    """Without a link the page asks for a name and a room; the user joins a second room,
    switches, sees the server's errors and leaves; a lost connection is shown, and Reconnect
    rejoins every room once the server is back."""
    web_port = free_port()
    server, _ = await servers(web_port, max_name=16)
    await in_thread(browser.get, f"http://127.0.0.1:{web_port}/")

    def log_in() -> None:
        browser.find_element(By.ID, "login-name").send_keys("cat")
        browser.find_element(By.ID, "login-room").send_keys("lobby" + Keys.ENTER)

    def join(room: str) -> None:
        browser.find_element(By.ID, "join-room").send_keys(room + Keys.ENTER)

    def switch_to(room: str) -> None:
        browser.find_element(By.XPATH, f"//ul[@id='rooms']//button[@title='{room}']").click()

    await in_thread(log_in)
    await in_thread(wait_for_line, browser, "cat: cat has joined this chatroom.")
    await in_thread(join, "kitchen")
    await in_thread(wait_for_text, browser, "room-title", "kitchen")
    await in_thread(wait_for_line, browser, "cat: cat has joined this chatroom.")
    await in_thread(type_message, browser, "in the kitchen")
    await in_thread(wait_for_line, browser, "cat: in the kitchen")
    await in_thread(switch_to, "lobby")
    await in_thread(wait_for_text, browser, "room-title", "lobby")
    assert "cat: in the kitchen" not in await in_thread(log_lines, browser)
    assert "room=lobby" in browser.current_url  # the address is a link to the room shown

    await in_thread(join, "a room name over sixteen bytes")
    await in_thread(wait_for_text, browser, "banner", "Could not join a room name over")
    await in_thread(wait_for_text, browser, "banner", "the server says error 1:")
    assert await in_thread(room_tabs, browser) == ["lobby", "kitchen"]

    server.shutdown("restart")
    await in_thread(wait_for_text, browser, "banner", "Connection to the server lost")
    await in_thread(wait_for_status, browser, "disconnected")
    assert await in_thread(lambda: browser.find_element(By.ID, "reconnect").is_displayed())
    assert not await in_thread(lambda: browser.find_element(By.ID, "message").is_enabled())

    await in_thread(lambda: browser.find_element(By.ID, "reconnect").click())
    await in_thread(wait_for_text, browser, "banner", "Could not connect to the server")
    await servers(web_port, max_name=16)  # back, with no rooms yet
    await in_thread(lambda: browser.find_element(By.ID, "reconnect").click())
    await in_thread(wait_for_status, browser, "connected")
    await in_thread(type_message, browser, "back again")
    await in_thread(wait_for_line, browser, "cat: back again")

    await in_thread(lambda: browser.find_element(By.ID, "leave").click())
    await in_thread(wait_for_text, browser, "room-title", "kitchen")
    await in_thread(wait_for_line, browser, "cat: in the kitchen")  # its log is kept
    await in_thread(type_message, browser, "still in the kitchen")
    await in_thread(wait_for_line, browser, "cat: still in the kitchen")
    assert await in_thread(room_tabs, browser) == ["kitchen"]


async def test_page_over_https_chats_over_secure_websocket(
    browser: webdriver.Chrome, servers: Servers, tls_files: TLSFiles
) -> None:
    """With --web-tls the page loads over HTTPS and chats over wss:// from its own origin."""
    web_port = free_port()
    await servers(web_port, web_tls=True, tls_cert=tls_files.cert, tls_key=tls_files.key)
    await in_thread(browser.get, f"https://127.0.0.1:{web_port}/?name=sue&room=secure")
    await in_thread(wait_for_line, browser, "sue: sue has joined this chatroom.")
    await in_thread(type_message, browser, "over TLS")
    await in_thread(wait_for_line, browser, "sue: over TLS")
