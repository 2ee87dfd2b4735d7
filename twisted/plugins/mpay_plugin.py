from twisted.application.service import ServiceMaker

mpay = ServiceMaker("mpay", "tap", "mpay payment platform: authentication and payment servers", "mpay")
